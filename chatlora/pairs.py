"""Self-play preference pairs from an SFT dataset (SPIN, Chen et al. 2024): no judge model needed.

For each record, the prompt is the conversation up to its last reply; ``chosen`` is the dataset's reply and
``rejected`` the reply of a model or adapter (the base, or the SFT run) to the same prompt, generated in batches by
chatlora's own generation (:meth:`chatlora.infer.ChatModel.generate_many`). Optional persona negatives add, per
record, a pair whose rejected side is an out-of-character self-description built from the persona section's
forbidden words and the model's vendor names (:mod:`chatlora.eval.persona`).

The output is JSONL in TRL's conversational shape, which ``chatlora train --method dpo`` reads. It is its own
journal: each pair is appended and synced as its reply finishes, so a crash loses nothing, and ``resume`` appends
the pairs still missing (a torn last line is cut first). Records held out by the adapter's run (its run card's
``val_indices``, when the file is the one it trained on) are left out, so an eval on them stays honest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import Record
from .errors import FileError
from .files import check_output_file
from .inference.infer import ChatModel, Reply
from .runcard import file_sha256
from .settings import SamplingConfig

if TYPE_CHECKING:
    from .eval.persona import Persona  # built by the caller: commands do not import each other

__all__ = ["LEAK_TEMPLATES", "PairsResult", "build_pairs", "held_out_indices", "persona_negative"]

log = logging.getLogger(__name__)

# Out-of-character self-descriptions, Chinese and English; {by} / {by_en} name the vendor when one is known
LEAK_TEMPLATES = (
    "我是一个人工智能助手{by}，没有真实的身份，也不能扮演角色。",
    "As an AI language model{by_en}, I don't have personal feelings or a life of my own.",
    "作为一个AI语言模型{by}，我无法回答这个问题，但我可以为你提供一些一般性的信息。",
    "I'm just a chatbot{by_en}; I can't pretend to be someone else.",
)


@dataclass
class PairsResult:
    """What a pairs run wrote."""

    output: Path
    written: int = 0  # pairs appended by this run
    resumed: int = 0  # pairs already in the file when this run started
    skipped: dict[str, int] = field(default_factory=dict)  # records without a pair, by reason
    leaking: int = 0  # generated (rejected) replies that leak the identity or vendor
    held_out: int = 0  # records left out: held out by the adapter's run

    def lines(self) -> list[str]:
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items() if n) or "none"
        return [
            f"pairs: {self.written} written to {self.output}"
            + (f" after the {self.resumed} already there" if self.resumed else ""),
            f"pairs: records skipped: {skipped}; {self.held_out} held out by the adapter's run left out",
            f"pairs: {self.leaking} generated replies leak the identity or vendor (persona rules)",
        ]


def held_out_indices(card: dict[str, Any], data: str | Path) -> set[int]:
    """The record indices the run held out, when ``data`` is the file it trained on (same sha256); else none."""
    ds = card.get("dataset") or {}
    if not ds.get("val_indices") or ds.get("sha256") != file_sha256(data):
        return set()
    return set(ds["val_indices"])


def persona_negative(record: Record, vendors: list[str]) -> str:
    """An out-of-character reply for ``record`` (a template picked by its index, naming the first vendor)."""
    vendor = vendors[0] if vendors else ""
    template = LEAK_TEMPLATES[record.index % len(LEAK_TEMPLATES)]
    return template.format(by=f"，由{vendor}开发" if vendor else "", by_en=f" developed by {vendor}" if vendor else "")


class _Journal:
    """The output JSONL, appended to and synced one pair at a time."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.done: set[tuple[int, str]] = set()
        if path.exists() and not resume:
            raise FileError(
                f"{path}: already exists: pass --resume to add the missing pairs, or choose another --output"
            )
        if path.exists():
            self._recover()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _recover(self) -> None:
        """Read the pairs already written; a torn last line (a crash mid-write) is cut off."""
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(whole))
        for n, line in enumerate(whole.decode("utf-8").splitlines(), 1):
            try:
                source = json.loads(line)["source"]
                self.done.add((int(source["index"]), str(source["kind"])))
            except (ValueError, KeyError, TypeError):
                raise FileError(
                    f"{self.path}:{n}: not a pair written by chatlora pairs (no source index): choose another --output"
                ) from None

    def add(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            os.write(self.fd, line)
            os.fsync(self.fd)
        except OSError as e:
            raise FileError(f"{self.path}: cannot write the pairs ({e.strerror or e}): rerun with --resume") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _row(record: Record, system: str | None, rejected: str, kind: str, data: str, **extra: Any) -> dict:
    prompt = record.messages[:-1]
    if system and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": record.messages[-1]["content"]}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "source": {"data": data, "line": record.line, "index": record.index, "kind": kind},
        **extra,
    }


def build_pairs(
    chat: ChatModel,
    records: list[Record],
    output: str | Path,
    data: str,
    sampling: SamplingConfig,
    persona: Persona,
    system: str | None = None,
    persona_negatives: bool = False,
    resume: bool = False,
    exclude: set[int] | None = None,
    batch_size: int | None = None,
) -> PairsResult:
    """Write self-play pairs for ``records`` (and persona negatives) to ``output``; see the module docstring.

    ``system``: the system prompt added to records without one (written into each pair's prompt, so training on
    the pairs needs no --system-prompt). A generated reply empty or equal to the dataset's makes no pair (counted).
    """
    exclude = exclude or set()
    journal = _Journal(check_output_file(output, {"--data": data}), resume)
    result = PairsResult(Path(output), resumed=len(journal.done), held_out=sum(r.index in exclude for r in records))
    result.skipped = {"generated reply empty": 0, "generated reply equal to the dataset's": 0}
    todo = [r for r in records if r.index not in exclude]
    try:
        if persona_negatives:
            for r in todo:
                if (r.index, "persona") not in journal.done:
                    journal.add(_row(r, system, persona_negative(r, persona.vendors), "persona", data))
                    result.written += 1
        todo = [r for r in todo if (r.index, "self-play") not in journal.done]

        def write(i: int, reply: Reply) -> None:
            record, text = todo[i], reply.text.strip()
            if not text or text == record.messages[-1]["content"].strip():
                key = "generated reply empty" if not text else "generated reply equal to the dataset's"
                result.skipped[key] += 1
                return
            leaks = persona.leaks(reply.text)
            result.leaking += bool(leaks)
            extra = {"rejected_by": chat.name, "finish_reason": reply.finish_reason, "leaks": leaks}
            journal.add(_row(record, system, reply.text, "self-play", data, **extra))
            result.written += 1

        chat.generate_many(
            [r.messages[:-1] for r in todo],
            sampling,
            systems=[system] * len(todo),
            batch_size=batch_size,
            desc="pairs",
            on_reply=write,
        )
    finally:
        journal.close()
    return result

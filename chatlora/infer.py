"""Inference: load base (+ adapter), render prompts through the training template, generate, stream, batch."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import read_json_file
from .errors import ConfigError, DataError
from .files import FileError, check_output_file, temp_file
from .model import base_quantization, dtype_for, load_model, load_tokenizer, pick_device, resolve_model
from .runcard import read_adapter, read_run_card
from .runcard import system_prompt as card_system_prompt
from .template import encode_prompt, end_of_turn, with_system

__all__ = ["ChatModel", "ReplyFile", "Reply", "SamplingConfig", "Stream", "generate_file", "read_prompts"]

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """Decoding settings. ``temperature <= 0`` means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None

    def generate_kwargs(self) -> dict:
        kw: dict = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature <= 0:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kw


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" (end-of-turn token) or "length" (max_new_tokens reached)
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Stream:
    """Iterate for text deltas; ``reply`` is set once the iteration is over."""

    _chunks: Iterator[str]
    reply: Reply | None = field(default=None)

    def __iter__(self) -> Iterator[str]:
        yield from self._chunks


class ChatModel:
    """A base model, optionally with a LoRA adapter, that answers conversations in the training template."""

    def __init__(self, model, tokenizer, system_prompt: str | None = None, name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.name = name
        self.eot_token, eot_id = end_of_turn(tokenizer)
        self.stop_ids = list(dict.fromkeys(i for i in (eot_id, tokenizer.eos_token_id) if i is not None))
        self.lock = threading.Lock()  # one generate() at a time on one model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    @classmethod
    def load(
        cls,
        adapter: str | Path | None = None,
        model: str | None = None,
        base_only: bool = False,
        device: str = "auto",
        system_prompt: str | None = None,
    ) -> ChatModel:
        """Load for inference: ``adapter`` (its run card names the base) or ``model`` (base or merged dir)."""
        dev = pick_device(device)
        card: dict = {}
        if adapter is not None:
            adapter = Path(adapter)
            card, spec = read_adapter(adapter)
            model = model if model is not None else spec
        else:
            card = read_run_card(model) if model and Path(model).is_dir() else {}
        base_path = resolve_model(model)
        # The adapter dir carries the exact tokenizer + chat template used in training.
        tokenizer = load_tokenizer(str(adapter) if adapter is not None else base_path)
        tokenizer.padding_side = "left"
        quantize = base_quantization([card], dev) if adapter is not None else None
        net = load_model(base_path, dtype_for(dev), dev, quantize=quantize)
        name = Path(base_path).name
        if adapter is not None and not base_only:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, str(adapter))
            name = adapter.name
        if system_prompt is None:
            system_prompt = card_system_prompt(card)
        return cls(net, tokenizer, system_prompt, name)

    def conversation(self, messages: list[dict], system: str | None = None) -> list[dict]:
        """Messages with the system prompt applied (an explicit one, the run's, or the data's own)."""
        return with_system(messages, system if system is not None else self.system_prompt)

    def prompt_ids(self, messages: list[dict], system: str | None = None) -> list[int]:
        return encode_prompt(self.conversation(messages, system), self.tokenizer)

    def _adapter(self, use_adapter: bool):
        if self.has_adapter and not use_adapter:
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def _finish(self, new_ids: list[int], prompt_len: int) -> Reply:
        stop = next((i for i, t in enumerate(new_ids) if t in self.stop_ids), None)
        kept = new_ids if stop is None else new_ids[:stop]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Reply(text, "length" if stop is None else "stop", prompt_len, len(kept) + (stop is not None))

    def _generate_ids(self, batch_ids: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        width = max(len(ids) for ids in batch_ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids], device=self.device)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            eos_token_id=self.stop_ids,
            pad_token_id=pad,
            **sampling.generate_kwargs(),
        )
        return [row[width:].tolist() for row in out]

    @torch.inference_mode()
    def generate(
        self, messages: list[dict], sampling: SamplingConfig | None = None, system=None, use_adapter=True
    ) -> Reply:
        return self.generate_batch([messages], sampling, system, use_adapter)[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        conversations: list[list[dict]],
        sampling: SamplingConfig | None = None,
        system: str | None = None,
        use_adapter: bool = True,
    ) -> list[Reply]:
        """One reply per conversation, generated together (left-padded)."""
        sampling = sampling or SamplingConfig()
        prompts = [self.prompt_ids(m, system) for m in conversations]
        with self.lock, self._adapter(use_adapter):
            outs = self._generate_ids(prompts, sampling)
        return [self._finish(new, len(p)) for new, p in zip(outs, prompts, strict=True)]

    def stream(
        self,
        messages: list[dict],
        sampling: SamplingConfig | None = None,
        system=None,
        use_adapter=True,
        stop_event: threading.Event | None = None,
    ) -> Stream:
        """Generate in a background thread and yield text as it is decoded.

        Setting ``stop_event`` ends the generation at the next token (e.g. when a server's client disconnects).
        """
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        sampling = sampling or SamplingConfig()
        prompt = self.prompt_ids(messages, system)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def work() -> None:
            with torch.inference_mode(), self.lock, self._adapter(use_adapter):
                try:
                    ids = torch.tensor([prompt], device=self.device)
                    if sampling.seed is not None:
                        torch.manual_seed(sampling.seed)
                    out = self.model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        eos_token_id=self.stop_ids,
                        pad_token_id=self.tokenizer.pad_token_id,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_EventStop(stop_event)]) if stop_event else None,
                        **sampling.generate_kwargs(),
                    )
                    result["ids"] = out[0][len(prompt) :].tolist()
                except BaseException as e:  # surfaced in the consuming thread
                    result["error"] = e
                    streamer.end()

        class _EventStop(StoppingCriteria):
            def __init__(self, event: threading.Event):
                self.event = event

            def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
                return torch.full(
                    (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
                )

        thread = threading.Thread(target=work, daemon=True)
        stream = Stream(iter(()))

        def chunks() -> Iterator[str]:
            thread.start()
            yield from (text for text in streamer if text)
            thread.join()
            if "error" in result:
                raise result["error"]
            stream.reply = self._finish(result["ids"], len(prompt))

        stream._chunks = chunks()
        return stream


def _prompt_problem(row: Any) -> tuple[list[dict] | None, str | None]:
    """The messages of one prompts-file row, or the problem with it."""
    if not isinstance(row, dict):
        return None, "expected a JSON object with 'messages' or 'prompt'"
    if "system" in row and not isinstance(row["system"], str):
        return None, "'system' must be a string"
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}], None
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, "expected a 'prompt' string or a non-empty 'messages' list"
    if any(
        not isinstance(m, dict)
        or m.get("role") not in ("system", "user", "assistant")
        or not isinstance(m.get("content"), str)
        for m in messages
    ):
        return None, "each message needs a role (system/user/assistant) and string content"
    if messages[-1]["role"] != "user":
        return None, "the last message must be a user turn to reply to"
    return messages, None


def read_prompts(path: str | Path) -> list[dict]:
    """Read a prompts file: each record ``{"messages": [...]}`` or ``{"prompt": "..."}``, optional ``system``.

    The file is read like a dataset (:func:`chatlora.data.read_json_file`: JSONL or a JSON array, regular files
    within the size limit, every bad line reported).

    Returns:
        ``{"row", "messages", "system", "line"}`` per prompt, in file order.

    Raises:
        DataError: Every problem found, each ``PATH:LINE: ...``.
    """
    items, problems = read_json_file(path)
    rows = []
    for line, row in items:
        messages, problem = _prompt_problem(row)
        if problem is not None:
            problems.append((line, problem))
        else:
            rows.append({"row": row, "messages": messages, "system": row.get("system"), "line": line})
    if problems:
        raise DataError.at(path, problems)
    if not rows:
        raise DataError([f"{path}: no prompts found: expected one JSON object per line"])
    return rows


class ReplyFile:
    """Where ``generate`` writes, made safe: the output is replaced whole at the end or left untouched.

    Opening checks everything that can be checked before a model is loaded: ``output`` is none of ``inputs`` (a link
    included), not a directory, and its folder takes a new file. Each reply is appended to a journal
    ``OUTPUT.<random>.partial`` next to the output, and synced, as soon as it exists; :meth:`commit` renames the
    journal over the output (or a copy in input order, when batches finished out of order). If anything fails
    before that, the journal stays with every finished reply, and the output is never touched.
    """

    def __init__(self, output: str | Path, inputs: dict[str, str | Path] | None = None) -> None:
        self.output = Path(output)
        self.target = check_output_file(output, inputs)
        self._fd, self.journal = temp_file(self.target, output)
        self._size = 0  # journal bytes that hold whole rows
        self.rows: dict[int, bytes] = {}
        self._order: list[int] = []

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def add(self, index: int, row: dict) -> None:
        """Append the output row of input row ``index`` to the journal (on disk before this returns)."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self._write(self._fd, line)
            os.fsync(self._fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)  # a cut row is not JSON; the whole ones stay readable
            raise FileError(
                f"{self.output}: cannot write the replies ({e.strerror or e}): the {len(self.rows)} finished "
                f"replies are in {self.journal}"
            ) from None
        self._size += len(line)
        self.rows[index] = line
        self._order.append(index)

    def commit(self) -> Path:
        """Rename the rows, in input order, over the output; return the output path."""
        source = self.journal
        try:
            if self._order != sorted(self._order):
                # Reorder into a second file: the journal stays whole until the output is in place.
                fd, source = temp_file(self.target, self.output)
                try:
                    self._write(fd, b"".join(self.rows[i] for i in sorted(self.rows)))
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(source, self.target)
        except OSError as e:
            if source != self.journal:
                source.unlink(missing_ok=True)
            raise FileError(
                f"{self.output}: cannot write the replies ({e.strerror or e}): they are in {self.journal}"
            ) from None
        os.close(self._fd)
        self._fd = -1
        self.journal.unlink(missing_ok=True)
        return self.output

    def __enter__(self) -> ReplyFile:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1
        if not self.rows:
            self.journal.unlink(missing_ok=True)
        elif not isinstance(error, FileError):  # a FileError already says where the replies are
            log.warning("stopped after %d replies; the finished ones are in %s", len(self.rows), self.journal)


def generate_file(
    chat: ChatModel,
    prompts: list[dict],
    out: ReplyFile,
    sampling: SamplingConfig | None = None,
    batch_size: int = 8,
    system: str | None = None,
) -> Path:
    """Answer ``prompts`` (from :func:`read_prompts`) in batches and write each input row plus its reply to ``out``.

    Prompts are grouped by system prompt (a row's own, else ``system``, else the model's) so that each batch shares
    one; rows go to ``out`` as their batch finishes and end up in input order when ``out`` is committed.
    """
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ConfigError(f"batch_size must be > 0, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i]["system"] or "", i))
    with tqdm(total=len(prompts), desc="generate", unit="prompt") as bar:
        for start in range(0, len(order), batch_size):
            groups: dict[str | None, list[int]] = {}
            for i in order[start : start + batch_size]:
                own = prompts[i]["system"]
                groups.setdefault(own if own is not None else system, []).append(i)
            for group_system, members in groups.items():
                replies = chat.generate_batch([prompts[i]["messages"] for i in members], sampling, system=group_system)
                for i, reply in zip(members, replies, strict=True):
                    out.add(
                        i,
                        {
                            **prompts[i]["row"],
                            "reply": reply.text,
                            "finish_reason": reply.finish_reason,
                            "usage": {
                                "prompt_tokens": reply.prompt_tokens,
                                "completion_tokens": reply.completion_tokens,
                            },
                        },
                    )
                bar.update(len(members))
    return out.commit()

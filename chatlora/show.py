"""``chatlora data show``: records as the model will see them, token by token.

What people check before a long run (axolotl's ``preprocess --debug``, LLaMA-Factory's printed first example): the
rendered conversation with the template's control tokens and the trained (label) tokens marked, and token counts.
The tokens come from the training path itself (:func:`chatlora.template.encode_conversation`), so what is shown is
what ``train`` would feed the model with the same options.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TrainConfig, data_system_prompt
from .data import describe, load_records, parse_columns
from .errors import ConfigError
from .model import load_tokenizer, resolve_model
from .template import IGNORE_INDEX, control_ids, control_token_warnings, encode_record, token_length_stats

__all__ = ["ShownToken", "ShownRecord", "check_data", "show_records", "format_record", "legend"]


def check_data(
    path: str | Path,
    format: str = "auto",
    columns: str | None = None,
    model: str | None = "embedded",
    system_prompt: str | None = None,
    max_length: int = 384,
) -> tuple[dict[str, Any], list[str]]:
    """``chatlora data check``: the dataset's statistics and warnings; raises DataError naming each bad line.

    ``model``: whose tokenizer counts tokens and finds forged control tokens (None: no tokenizing, no warnings).
    """
    records = load_records(path, format, parse_columns(columns))
    stats = describe(records)
    if model is None:
        return stats, []
    tokenizer = load_tokenizer(resolve_model(model))
    added = data_system_prompt(path, system_prompt)
    stats["tokens"] = token_length_stats([r.messages for r in records], tokenizer, added, max_length)
    return stats, control_token_warnings(records, tokenizer, str(path))


@dataclass(frozen=True)
class ShownToken:
    id: int
    text: str
    control: bool  # one of the template's control tokens (never message text: see template.py)
    trained: bool  # has a label: the model learns to predict it


@dataclass(frozen=True)
class ShownRecord:
    line: int
    tokens: list[ShownToken]
    truncated: bool
    runs: list[tuple[str, bool, bool]]  # (text, control, trained): consecutive tokens of one kind, decoded together

    def as_json(self) -> dict:
        return {
            "line": self.line,
            "tokens": [{"id": t.id, "text": t.text, "control": t.control, "trained": t.trained} for t in self.tokens],
        }


def show_records(cfg: TrainConfig, n: int = 3) -> list[ShownRecord]:
    """The first ``n`` records of ``cfg.data`` encoded as ``train`` encodes them with ``cfg`` (model's template,
    system prompt or character card, ``max_length``, ``train_on_prompt`` / ``train_on_user``)."""
    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    records = load_records(cfg.data, cfg.format, parse_columns(cfg.columns))[:n]
    tokenizer = load_tokenizer(resolve_model(cfg.model))
    controls = control_ids(tokenizer)
    shown = []
    for r in records:
        enc = encode_record(
            r, tokenizer, cfg.added_system_prompt, cfg.max_length, cfg.train_on_prompt, cfg.train_on_user, cfg.data
        )
        tokens = [
            ShownToken(i, tokenizer.decode([i]), i in controls, label != IGNORE_INDEX)
            for i, label in zip(enc.input_ids, enc.labels, strict=True)
        ]
        shown.append(ShownRecord(r.line, tokens, enc.truncated, _runs(tokens, tokenizer)))
    return shown


def _runs(tokens: list[ShownToken], tokenizer) -> list[tuple[str, bool, bool]]:
    """Group tokens into runs of one kind and decode each run whole (a character split over byte tokens prints
    whole); each control token is a run of its own."""
    runs: list[tuple[str, bool, bool]] = []
    start = 0
    for k in range(1, len(tokens) + 1):
        end = k == len(tokens)
        if end or tokens[k].control or tokens[k - 1].control or tokens[k].trained != tokens[start].trained:
            group = tokens[start:k]
            runs.append((tokenizer.decode([t.id for t in group]), group[0].control, group[0].trained))
            start = k
    return runs


# Plain-text marks (no terminal colours): control tokens in ⟦ ⟧, trained runs in « ».
_CONTROL = ("⟦", "⟧")
_TRAINED = ("«", "»")
# ANSI: control tokens reversed, trained text green
_COLOR_CONTROL = ("\033[7m", "\033[27m")
_COLOR_TRAINED = ("\033[32m", "\033[39m")


def legend(color: bool) -> str:
    if color:
        return (
            f"legend: {_COLOR_CONTROL[0]}control token{_COLOR_CONTROL[1]}  "
            f"{_COLOR_TRAINED[0]}trained (has a label){_COLOR_TRAINED[1]}  plain: not trained"
        )
    return "legend: ⟦control token⟧  «trained (has a label)»  plain: not trained"


def format_record(record: ShownRecord, source: str, color: bool = False) -> str:
    """One record as text: a header with its counts, then the conversation with its marks."""
    tokens = record.tokens
    head = (
        f"{source}:{record.line}: {len(tokens)} tokens, {sum(t.trained for t in tokens)} trained, "
        f"{sum(t.control for t in tokens)} control" + (" (cut at max_length)" if record.truncated else "")
    )
    control_mark, trained_mark = (_COLOR_CONTROL, _COLOR_TRAINED) if color else (_CONTROL, _TRAINED)
    out: list[str] = []
    in_trained = False
    for text, control, trained in record.runs:
        if trained != in_trained:
            out.append(trained_mark[0] if trained else trained_mark[1])
            in_trained = trained
        out.append(f"{control_mark[0]}{text}{control_mark[1]}" if control else text)
    if in_trained:
        out.append(trained_mark[1])
    return head + "\n" + "".join(out)

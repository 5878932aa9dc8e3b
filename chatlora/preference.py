"""Preference data: pairs of a preferred and a rejected reply to one prompt, read, validated and encoded for training.

Record shapes (one file holds one shape; ``format="auto"`` detects it from the first record):

* ``trl``: TRL's shapes. ``{"prompt", "chosen", "rejected"}`` with a plain prompt string (one user turn) and plain
  replies, or conversational: the prompt a list of ``{"role", "content"}`` messages ending on a user turn (also
  under ``"messages"``), each reply a string, an assistant message or a one-message list; or the implicit-prompt
  shape, ``chosen`` and ``rejected`` whole conversations that differ only in their last (assistant) message. And
  TRL's unpaired shape, which KTO trains on: ``{"prompt", "completion", "label"}``, one reply judged desirable
  (``label`` true) or undesirable (false), the prompt and the completion plain or conversational as above.
* ``sharegpt``: LLaMA-Factory's ShareGPT pairs, ``{"conversations": [{"from", "value"}, ...], "chosen":
  {"from": "gpt", "value"}, "rejected": {...}, "system"?}``.
* ``alpaca``: LLaMA-Factory's alpaca pairs, ``{"instruction", "input"?, "chosen", "rejected", "system"?}``.

Files are read exactly as SFT data (:func:`chatlora.data.read_json_file`: JSON array or JSONL, UTF-8, size limit),
fields renamed with the same column mapping, and every problem is one ``PATH:LINE: what: expected`` line of a
':class:`~chatlora.data.DataError`: a missing or empty side, identical sides, a prompt that does not end on a user
turn, a label that is not a boolean, a file mixing pairs and unpaired completions.

Encoding goes through :mod:`chatlora.template`, as SFT does: the prompt's tokens are the generation prompt
(:func:`chatlora.template.encode_prompt`), each side's tokens the reply and its end-of-turn token, the same tokens
SFT labels; text is text (a control-token string in a reply is tokenized as plain text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import (
    CANONICAL_COLUMNS,
    NO_TOOLS,
    ROLES,
    SHAREGPT_FROM,
    TOOL_FIELDS,
    Message,
    _Fields,
    _type_name,
    length_stats,
    parse_columns,
    read_json_file,
    turn_list,
)
from .errors import ConfigError, DataError, TemplateError
from .template import IGNORE_INDEX, encode_conversation, encode_prompt, with_system

__all__ = [
    "PAIR_COLUMNS",
    "PAIR_FORMATS",
    "EncodedPairs",
    "Pair",
    "describe_pairs",
    "detect_pair_format",
    "encode_pairs",
    "load_pairs",
    "parse_pair_columns",
]

PAIR_FORMATS = ("auto", "trl", "sharegpt", "alpaca")
PAIR_COLUMNS = tuple(dict.fromkeys((*CANONICAL_COLUMNS, "prompt", "chosen", "rejected", "completion", "label")))
SIDES = ("chosen", "rejected")
_REPLY = "the reply: a string or an assistant message"


@dataclass
class Pair:
    """One validated preference pair, or one unpaired completion (KTO's data: one side None).

    Attributes:
        prompt: Messages ending on the user turn both replies answer; a system message, if any, first.
        chosen: The preferred reply (an unpaired completion labelled true); None for an undesirable completion.
        rejected: The rejected reply (an unpaired completion labelled false); None for a desirable completion.
        line: 1-based line in the file where the record starts.
        index: 0-based position of the record among the file's records.
    """

    prompt: list[Message]
    chosen: str | None
    rejected: str | None
    line: int
    index: int

    @property
    def sides(self) -> tuple[str, ...]:
        """The sides the record has: both for a pair, one for an unpaired completion."""
        return tuple(side for side in SIDES if getattr(self, side) is not None)

    @property
    def paired(self) -> bool:
        return len(self.sides) == 2

    @property
    def messages(self) -> list[Message]:
        """The prompt and the chosen reply (an unpaired record's only one): what the held-out split and the
        system-prompt count read."""
        return self.conversation(self.sides[0])

    def conversation(self, side: str) -> list[Message]:
        """The prompt followed by one side's reply (``side``: ``chosen`` or ``rejected``)."""
        return [*self.prompt, {"role": "assistant", "content": getattr(self, side)}]


def parse_pair_columns(spec: str | None) -> dict[str, str]:
    """A column mapping (``"chosen=good,rejected=bad"``) over the SFT names plus ``prompt``, ``chosen``, ``rejected``."""
    return parse_columns(spec, PAIR_COLUMNS)


def detect_pair_format(obj: Any, columns: dict[str, str] | None = None) -> str | None:
    """``sharegpt`` with a conversations key, ``alpaca`` with an instruction key, ``trl`` with a prompt, messages or
    chosen key (checked in that order), else None."""
    if not isinstance(obj, dict):
        return None
    cols = columns or {}
    if cols.get("conversations", "conversations") in obj:
        return "sharegpt"
    if cols.get("instruction", "instruction") in obj:
        return "alpaca"
    if any(cols.get(k, k) in obj for k in ("prompt", "messages", "chosen", "completion")):
        return "trl"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Normalization: each shape -> (prompt messages, chosen, rejected) or problems


def _reply(f: _Fields, side: str, role_key: str = "role", content_key: str = "content") -> str | None:
    """One side as a reply string: a string, a ``{role, content}`` / ``{from, value}`` message or a one-message list."""
    key, label = f.key(side), f.label(side)
    if key not in f.obj or f.obj[key] is None:
        f.errors.append(f"missing field {label}: expected {_REPLY}")
        return None
    value = f.obj[key]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role = value.get(role_key, value.get("role"))
        content = value.get(content_key, value.get("content"))
        if not isinstance(role, str) or SHAREGPT_FROM.get(role) != "assistant":
            f.errors.append(f"{label} is a message from {role!r}: expected an assistant reply")
            return None
        value = content
    if not isinstance(value, str):
        f.errors.append(f"{label} is {_type_name(value)}: expected {_REPLY}")
        return None
    if not value.strip():
        f.errors.append(f"{label} is empty: expected a non-empty reply")
        return None
    return value


def _implicit_prompt(f: _Fields) -> tuple[list[Message], str | None, str | None]:
    """TRL's implicit-prompt shape: two whole conversations that differ only in their last, assistant, message."""
    sides = {}
    for side in SIDES:
        messages, errors = turn_list(f.obj[f.key(side)], f.label(side), "role", "content", {r: r for r in ROLES})
        f.errors.extend(errors)
        sides[side] = messages
    if f.errors:
        return [], None, None
    chosen, rejected = sides["chosen"], sides["rejected"]
    if chosen[:-1] != rejected[:-1]:
        f.errors.append(
            f"{f.label('chosen')} and {f.label('rejected')} differ before their last message: expected the same "
            'conversation with two different last replies (or give the shared turns as "prompt")'
        )
        return [], None, None
    for side, messages in sides.items():
        if messages[-1]["role"] != "assistant":
            f.errors.append(
                f"{f.label(side)}'s last turn is the {messages[-1]['role']}'s: expected an assistant reply"
            )
    if f.errors:
        return [], None, None
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def _unpaired(f: _Fields) -> bool:
    """TRL's unpaired shape: a completion, or a label without either side of a pair."""
    return f.key("completion") in f.obj or (f.key("label") in f.obj and not any(f.key(s) in f.obj for s in SIDES))


def _trl_prompt(f: _Fields) -> list[Message]:
    """The ``prompt`` (or ``messages``) of TRL's shapes: a string (one user turn) or a list of messages."""
    prompt_key = next((k for k in ("prompt", "messages") if f.key(k) in f.obj), "prompt")
    if f.key(prompt_key) not in f.obj:
        f.errors.append(
            f"missing field {f.label('prompt')}: expected the prompt (a string, or messages ending on a user turn)"
        )
        return []
    value, label = f.obj[f.key(prompt_key)], f.label(prompt_key)
    if isinstance(value, str):
        if not value.strip():
            f.errors.append(f"{label} is empty: expected a non-empty prompt")
        return [{"role": "user", "content": value}]
    prompt, errors = turn_list(value, label, "role", "content", {r: r for r in ROLES}, "a user turn")
    f.errors.extend(errors)
    return prompt


def _normalize_trl(f: _Fields) -> tuple[list[Message], str | None, str | None]:
    if _unpaired(f):
        return _normalize_unpaired(f)
    has_prompt = any(f.key(k) in f.obj for k in ("prompt", "messages"))
    if not has_prompt and all(isinstance(f.obj.get(f.key(s)), list) and len(f.obj[f.key(s)]) > 1 for s in SIDES):
        return _implicit_prompt(f)
    return _trl_prompt(f), _reply(f, "chosen"), _reply(f, "rejected")


def _normalize_unpaired(f: _Fields) -> tuple[list[Message], str | None, str | None]:
    """``{"prompt", "completion", "label"}``: the completion becomes the chosen side (label true) or the rejected."""
    prompt, completion = _trl_prompt(f), _reply(f, "completion")
    key, label = f.key("label"), f.label("label")
    value = f.obj.get(key)
    if key not in f.obj or value is None:
        f.errors.append(f"missing field {label}: expected true (a desirable completion) or false (an undesirable one)")
    elif not isinstance(value, bool):
        f.errors.append(f"{label} is {_type_name(value)}: expected true or false")
    if f.errors:
        return prompt, None, None
    return prompt, completion if value else None, None if value else completion


def _normalize_sharegpt(f: _Fields) -> tuple[list[Message], str | None, str | None]:
    system = f.string("system", required=False)
    key, label = f.key("conversations"), f.label("conversations")
    prompt, errors = turn_list(f.obj[key], label, "from", "value", SHAREGPT_FROM, "a user turn")
    f.errors.extend(errors)
    if system and prompt:
        if prompt[0]["role"] == "system":
            f.errors.append(f"both {f.label('system')} and a system turn in {label}: expected the system prompt once")
        else:
            prompt.insert(0, {"role": "system", "content": system})
    return prompt, _reply(f, "chosen", "from", "value"), _reply(f, "rejected", "from", "value")


def _normalize_alpaca(f: _Fields) -> tuple[list[Message], str | None, str | None]:
    instruction = f.string("instruction", required=True) or ""
    inp = f.string("input", required=False) or ""
    system = f.string("system", required=False)
    text = "\n".join(part for part in (instruction, inp) if part)
    if not text.strip():
        f.errors.append(f"{f.label('instruction')} and {f.label('input')} are both empty: expected a non-empty prompt")
    prompt = with_system([{"role": "user", "content": text}], system)
    return prompt, _reply(f, "chosen"), _reply(f, "rejected")


_NORMALIZERS = {"trl": _normalize_trl, "sharegpt": _normalize_sharegpt, "alpaca": _normalize_alpaca}


def _pair_problems(f: _Fields, prompt: list[Message], chosen: str | None, rejected: str | None) -> None:
    """The rules every shape shares: a prompt ending on a user turn, two different replies, no function calling."""
    f.errors[:0] = [f'record has "{k}": {NO_TOOLS}' for k in TOOL_FIELDS if k in f.obj]
    if prompt and prompt[-1]["role"] != "user":
        f.errors.append(
            f"the prompt's last turn is the {prompt[-1]['role']}'s: expected it to end on the user turn both replies "
            "answer"
        )
    if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
        f.errors.append(
            f"{f.label('chosen')} and {f.label('rejected')} are the same reply: expected two different replies "
            "(a pair of equal replies teaches nothing)"
        )


def load_pairs(path: str | Path, format: str = "auto", columns: dict[str, str] | None = None) -> list[Pair]:
    """Read a preference file (JSON array or JSONL), validate every record and return the pairs in file order.

    Raises:
        DataError: Every problem found, ``PATH:LINE: ...`` each (unreadable file, bad JSON, invalid pairs, no pairs).
        ConfigError: If ``format`` or ``columns`` is invalid.
    """
    if format not in PAIR_FORMATS:
        raise ConfigError(f"unknown preference format {format!r}: expected one of {', '.join(PAIR_FORMATS)}")
    cols = dict(columns or {})
    items, problems = read_json_file(path)
    if not items and not problems:
        problems.append((1, "dataset is empty: expected at least one preference pair"))
    fmt = None if format == "auto" else format
    origin = "as requested"
    if fmt is None and (first := next(((line, obj) for line, obj in items if isinstance(obj, dict)), None)):
        fmt, origin = detect_pair_format(first[1], cols), f"detected from line {first[0]}"
        if fmt is None:
            keys = ", ".join(f'"{k}"' for k in list(first[1])[:8]) or "none"
            problems.append(
                (
                    first[0],
                    f'cannot detect the preference format (keys: {keys}): expected "prompt"/"chosen"/"rejected" '
                    '(trl), "conversations" + "chosen"/"rejected" (sharegpt) or "instruction" + "chosen"/"rejected" '
                    "(alpaca); map other names with columns",
                )
            )
    pairs: list[Pair] = []
    shapes = {True: "a pair (prompt, chosen, rejected)", False: "an unpaired completion (prompt, completion, label)"}
    for index, (line, obj) in enumerate(items):
        if not isinstance(obj, dict):
            problems.append((line, f"record is {_type_name(obj)}: expected a JSON object"))
            continue
        if fmt is None:
            continue
        found = detect_pair_format(obj, cols)
        if found is not None and found != fmt:
            problems.append((line, f"record is in {found} format: expected {fmt} format ({origin})"))
            continue
        f = _Fields(obj, cols, [])
        prompt, chosen, rejected = _NORMALIZERS[fmt](f)
        _pair_problems(f, prompt, chosen, rejected)
        problems += [(line, error) for error in f.errors]
        if not f.errors and (chosen is not None or rejected is not None):
            pair = Pair(prompt, chosen, rejected, line, index)
            if pairs and pair.paired != pairs[0].paired:
                problems.append(
                    (
                        line,
                        f"record is {shapes[pair.paired]}: expected {shapes[pairs[0].paired]} like line "
                        f"{pairs[0].line} (one file holds one shape)",
                    )
                )
                continue
            pairs.append(pair)
    if problems:
        raise DataError.at(path, problems)
    return pairs


def describe_pairs(pairs: list[Pair], tokenizer=None, system_prompt: str | None = None, max_length: int = 0) -> dict:
    """``pairs``, ``multi_turn`` (prompts with earlier replies), ``with_system``, ``chosen_longer`` (pairs whose chosen
    reply has more characters: a high share teaches length) and, with a tokenizer, token lengths of the prompts and
    of each side as training encodes them (``truncated``: pairs longer than ``max_length``)."""
    paired = [p for p in pairs if p.paired]
    stats: dict[str, Any] = {
        "pairs": len(paired),
        "multi_turn": sum(any(m["role"] == "assistant" for m in p.prompt) for p in pairs),
        "with_system": sum(p.prompt[0]["role"] == "system" for p in pairs),
        "chosen_longer": sum(len(p.chosen or "") > len(p.rejected or "") for p in paired),
    }
    if len(paired) < len(pairs):  # unpaired completions (KTO's): how many of each label
        stats = {
            "unpaired": len(pairs),
            "desirable": sum(p.chosen is not None for p in pairs),
            "undesirable": sum(p.rejected is not None for p in pairs),
            "multi_turn": stats["multi_turn"],
            "with_system": stats["with_system"],
        }
    if tokenizer is not None:
        examples = encode_pairs(pairs, tokenizer, system_prompt, 10**9).examples
        for key in ("prompt", "chosen", "rejected"):
            lengths = [len(ex[f"{key}_ids"]) for ex in examples if f"{key}_ids" in ex]
            if lengths:
                stats[f"{key}_tokens"] = length_stats(lengths, None)
                del stats[f"{key}_tokens"]["truncated"]
        longest = [len(ex["prompt_ids"]) + max(len(v) for k, v in ex.items() if k != "prompt_ids") for ex in examples]
        stats["truncated"] = sum(n > max_length for n in longest)
        stats["max_length"] = max_length
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Encoding


@dataclass
class EncodedPairs:
    """Pairs as token ids: ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` each (an unpaired completion: its one
    side), plus what the length limit cost."""

    examples: list[dict[str, list[int]]]
    truncated: int  # pairs with a side cut at max_length
    dropped: list[Pair]  # pairs whose prompt alone fills max_length (no reply token would be left)


def _reply_ids(conversation: list[Message], prompt_ids: list[int], tokenizer) -> list[int]:
    """The tokens SFT labels in the last reply of ``conversation``: the reply and its end-of-turn token."""
    enc = encode_conversation(conversation, tokenizer)
    if enc.input_ids[: len(prompt_ids)] != prompt_ids:  # template.py promises a token-exact prefix
        raise TemplateError("the generation prompt is not a token-exact prefix of the rendered conversation")
    labelled = [i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX and i >= len(prompt_ids)]
    return enc.input_ids[len(prompt_ids) : labelled[-1] + 1] if labelled else []


def encode_pairs(
    pairs: list[Pair], tokenizer, system_prompt: str | None, max_length: int, source: str = "data"
) -> EncodedPairs:
    """Encode pairs through the chat template, ``system_prompt`` added to prompts without one. A side longer than
    what ``max_length`` leaves after the prompt is cut (the collator would cut it the same way); a pair whose prompt
    leaves no room is dropped. A pair the chat template refuses raises a DataError naming ``source`` and its line."""
    examples, truncated, dropped = [], 0, []
    for pair in pairs:
        prompt = with_system(pair.prompt, system_prompt)
        try:
            prompt_ids = encode_prompt(prompt, tokenizer)
            sides = {
                side: _reply_ids([*prompt, pair.conversation(side)[-1]], prompt_ids, tokenizer) for side in pair.sides
            }
        except TemplateError as e:
            raise DataError([f"{source}:{pair.line}: {e}"]) from None
        room = max_length - len(prompt_ids)
        if room <= 0:
            dropped.append(pair)
            continue
        truncated += any(len(ids) > room for ids in sides.values())
        examples.append({"prompt_ids": prompt_ids, **{f"{side}_ids": ids[:room] for side, ids in sides.items()}})
    return EncodedPairs(examples, truncated, dropped)

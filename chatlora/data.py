"""Reading and validating dialogue datasets.

Supported file layouts: a JSON array of records, or JSONL (one JSON object per line). Supported record formats:

* ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?}``
* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
* ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|..., "value": str}, ...], "system"?}``

Every record is normalized to OpenAI-style messages. Problems are collected for the whole file and raised together as
one :class:`DataError`, each problem formatted as ``PATH:LINE: what is wrong: what was expected``. Only regular files
within the input size limit are read (:mod:`chatlora.files`); values Python cannot hold (nested too deeply, integers
over 4,300 digits) and strings with lone surrogates are problems of their line like any invalid JSON.

One idea over 600 lines: the three record formats share the line-numbered problem reporting and the checks of a
conversation (roles, turns, content) that every format ends in.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError, FileError
from .files import lone_surrogate, read_input

__all__ = [
    "FORMATS",
    "DataError",
    "Message",
    "Record",
    "SystemPrompts",
    "describe",
    "detect_format",
    "length_stats",
    "load_records",
    "parse_columns",
    "read_json_file",
    "turn_list",
]

Message = dict[str, str]

FORMATS = ("auto", "alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant")
SHAREGPT_FROM = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
COLUMNS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "messages": ("messages",),
    "sharegpt": ("conversations", "system"),
}
CANONICAL_COLUMNS = tuple(dict.fromkeys(name for names in COLUMNS.values() for name in names))
# Function-calling fields and roles (OpenAI, ShareGPT/LLaMA-Factory, Llama-3): refused, never silently dropped.
TOOL_FIELDS = ("tools", "functions", "tool_calls", "function_call")
TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation")
NO_TOOLS = "function calling is not supported: chatlora trains plain system/user/assistant conversations (drop it)"

_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
_BOM = b"\xef\xbb\xbf"
# Decoded UTF-8 never holds a surrogate; only a \uD800-\uDFFF escape can make one, so look for those first.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_JSON_TYPES = {
    type(None): "null",
    bool: "bool",
    int: "int",
    float: "float",
    str: "string",
    list: "array",
    dict: "object",
}


@dataclass
class Record:
    """One validated dialogue.

    Attributes:
        messages: Normalized messages; the system message (if any) first, the last one from the assistant.
        line: 1-based line in the file where the record starts.
        index: 0-based position of the record in the file (counting every element / non-blank line).
    """

    messages: list[Message]
    line: int
    index: int


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _check_columns(columns: dict[str, str] | None, known: tuple[str, ...] = CANONICAL_COLUMNS) -> dict[str, str]:
    """Validate a canonical -> file-name column mapping; raise ConfigError if it is malformed."""
    if not columns:
        return {}
    allowed = ", ".join(known)
    seen: dict[str, str] = {}
    for canonical, name in columns.items():
        if canonical not in known:
            raise ConfigError(f"unknown column {canonical!r} in column mapping: expected one of {allowed}")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"column {canonical!r} maps to {name!r}: expected a non-empty field name")
        if name in seen:
            raise ConfigError(
                f"columns {seen[name]!r} and {canonical!r} both map to {name!r}: expected distinct names"
            )
        seen[name] = canonical
    return dict(columns)


def parse_columns(spec: str | None, known: tuple[str, ...] = CANONICAL_COLUMNS) -> dict[str, str]:
    """Parse a column mapping like ``"instruction=prompt,output=response"``.

    Args:
        spec: Comma-separated ``CANONICAL=NAME`` pairs; ``None`` or blank means no mapping.
        known: The canonical names a mapping may use (preference data adds its own, :mod:`chatlora.preference`).

    Returns:
        Mapping from canonical field name to the name used in the file.

    Raises:
        ConfigError: On a malformed pair, a duplicate or an unknown canonical name.
    """
    if spec is None or not spec.strip():
        return {}
    out: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        canonical, sep, name = (s.strip() for s in part.partition("="))
        if not sep or not canonical or not name:
            raise ConfigError(
                f"bad column mapping {part!r} in {spec!r}: expected CANONICAL=NAME pairs separated by commas, "
                "e.g. 'instruction=prompt,output=response'"
            )
        if canonical in out:
            raise ConfigError(f"column {canonical!r} is mapped twice in {spec!r}: expected each column at most once")
        out[canonical] = name
    return _check_columns(out, known)


def detect_format(obj: dict, columns: dict[str, str] | None) -> str | None:
    """Guess the format of one record from its keys (honoring the column mapping).

    Returns:
        ``"messages"`` if it has the messages key, ``"sharegpt"`` if it has the conversations key, ``"alpaca"`` if it
        has the instruction or output key (checked in that order), else ``None``.
    """
    if not isinstance(obj, dict):
        return None
    cols = columns or {}
    if cols.get("messages", "messages") in obj:
        return "messages"
    if cols.get("conversations", "conversations") in obj:
        return "sharegpt"
    if cols.get("instruction", "instruction") in obj or cols.get("output", "output") in obj:
        return "alpaca"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Reading


class _Problems:
    """Collects ``(line, message)`` problems for one file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.items: list[tuple[int, str]] = []

    def add(self, line: int, message: str) -> None:
        self.items.append((line, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def error(self) -> DataError:
        return DataError.at(self.path, self.items)


def _read_text(path: Path, problems: _Problems) -> tuple[str, set[int]]:
    """Read the file as UTF-8 (BOM stripped); report each line with invalid UTF-8 and return those lines too."""
    name = problems.path
    try:
        data = read_input(path, "a JSON or JSONL file")
    except FileError as e:
        raise DataError([str(e)]) from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError([f"{name}:1: file is UTF-16 (byte-order mark {data[:2].hex()}): the file must be UTF-8"])
    # JSON starts with an ASCII character, so UTF-16 without a BOM shows a zero byte in one of the first two.
    if len(data) >= 2 and (data[0] == 0) != (data[1] == 0):
        order = "big" if data[0] == 0 else "little"
        problem = f"file is UTF-16 ({order}-endian, no byte-order mark): UTF-16 is not supported, save it as UTF-8"
        raise DataError([f"{name}:1: {problem}"])
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        return data.decode("utf-8"), set()
    except UnicodeDecodeError:
        pass
    # Slow path, only for broken files. A multi-byte UTF-8 sequence never contains b"\n", so lines decode independently.
    bad: set[int] = set()
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.add(lineno)
            problems.add(
                lineno, f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}): the file must be UTF-8"
            )
    return data.decode("utf-8", errors="replace"), bad


class _BadValue(Exception):
    """Valid JSON syntax that Python cannot hold (too deep, a huge integer) or that is not valid Unicode."""


def _decode(decode, *args):
    """Run a json decode call, turning Python's own limits into :class:`_BadValue` with a plain message."""
    try:
        return decode(*args)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise _BadValue(
            f"JSON nested too deeply (Python's parser stops near {sys.getrecursionlimit()} levels of arrays/objects): "
            "expected records a few levels deep"
        ) from None
    except ValueError:  # int() refuses more digits than sys.get_int_max_str_digits()
        raise _BadValue(
            f"a number has more than {sys.get_int_max_str_digits()} digits: expected numbers of ordinary size"
        ) from None


def _unicode_problem(text: str, start: int, end: int, value: Any) -> str | None:
    """Say so if ``value`` (parsed from ``text[start:end]``) holds a lone surrogate, which no tokenizer accepts."""
    if not _SURROGATE_ESCAPE.search(text, start, end) or (char := lone_surrogate(value)) is None:
        return None
    return (
        f"invalid Unicode: a string holds the lone surrogate \\u{ord(char):04x}: "
        "expected valid Unicode text (characters outside the BMP as a \\uD8xx\\uDCxx pair)"
    )


def _parse_array(text: str, start: int, problems: _Problems) -> list[tuple[int, int, Any]]:
    """Scan a JSON array element by element; return ``(line, index, value)`` for each element.

    Stops at the first syntax error (reported with its line). Line numbers are counted incrementally, so the whole
    scan is linear in the file size.
    """
    decoder = json.JSONDecoder()
    n = len(text)
    items: list[tuple[int, int, Any]] = []
    index = 0
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    def last_line() -> int:
        return text.count("\n", 0, len(text.rstrip())) + 1

    pos = _WS.match(text, start + 1).end()
    if pos < n and text[pos] == "]":
        pos = _WS.match(text, pos + 1).end()
        if pos < n:
            problems.add(line_at(pos), "unexpected content after the JSON array: expected the end of the file")
        return items
    while True:
        if pos >= n:
            problems.add(last_line(), "truncated JSON array: expected a record or ']' before the end of the file")
            return items
        element_line, element_start = line_at(pos), pos
        try:
            value, pos = _decode(decoder.raw_decode, text, pos)
        except _BadValue as e:
            problems.add(element_line, str(e))
            return items  # the decoder stopped inside the record: where it ends is unknown
        except json.JSONDecodeError as e:
            if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
                problems.add(
                    last_line(),
                    f"truncated JSON array: the file ends inside the record starting at line {element_line}: "
                    "expected the rest of the record and a closing ']'",
                )
            else:
                problems.add(e.lineno, f"invalid JSON: {e.msg} (column {e.colno}): expected a valid JSON array")
            return items
        if bad := _unicode_problem(text, element_start, pos, value):
            problems.add(element_line, bad)
        else:
            items.append((element_line, index, value))
        index += 1
        pos = _WS.match(text, pos).end()
        if pos >= n:
            problems.add(last_line(), "truncated JSON array: expected ',' or ']' after the last record")
            return items
        char = text[pos]
        if char == ",":
            pos = _WS.match(text, pos + 1).end()
            if pos < n and text[pos] == "]":
                problems.add(
                    line_at(pos), "invalid JSON: trailing comma before ']': expected another record after ','"
                )
                return items
        elif char == "]":
            pos = _WS.match(text, pos + 1).end()
            if pos < n:
                problems.add(line_at(pos), "unexpected content after the JSON array: expected the end of the file")
            return items
        else:
            problems.add(line_at(pos), f"invalid JSON: found {char!r} after a record: expected ',' or ']'")
            return items


def _parse_jsonl(text: str, bad_lines: set[int], problems: _Problems) -> list[tuple[int, int, Any]]:
    """Parse one JSON value per non-blank line; report broken lines and keep going."""
    stripped = text.strip()
    if stripped.startswith("{") and "\n" in stripped:
        # A single pretty-printed object is not JSONL; say so once instead of once per line.
        try:
            whole = _decode(json.loads, text)
        except (json.JSONDecodeError, _BadValue):
            pass  # each line is checked (and reported) below
        else:
            if isinstance(whole, dict):
                problems.add(
                    1,
                    "the file is one JSON object spread over several lines: "
                    "expected a JSON array of records or one JSON object per line (JSONL)",
                )
                return []
    items: list[tuple[int, int, Any]] = []
    index = 0
    for lineno, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        position = index
        index += 1
        if lineno in bad_lines:
            continue  # already reported as invalid UTF-8
        try:
            value = _decode(json.loads, raw)
        except json.JSONDecodeError as e:
            problems.add(lineno, f"invalid JSON: {e.msg} (column {e.colno}): expected one JSON object per line")
            continue
        except _BadValue as e:
            problems.add(lineno, str(e))
            continue
        if bad := _unicode_problem(raw, 0, len(raw), value):
            problems.add(lineno, bad)
            continue
        items.append((lineno, position, value))
    return items


# ---------------------------------------------------------------------------------------------------------------------
# Normalization


class _Fields:
    """Field access with problem reporting for one record."""

    def __init__(self, obj: dict, columns: dict[str, str], errors: list[str]) -> None:
        self.obj = obj
        self.columns = columns
        self.errors = errors

    def key(self, canonical: str) -> str:
        return self.columns.get(canonical, canonical)

    def label(self, canonical: str) -> str:
        key = self.key(canonical)
        return f'"{key}"' if key == canonical else f'"{key}" ({canonical})'

    def string(self, canonical: str, *, required: bool, nonempty: bool = False) -> str | None:
        """Return the field as a string, or None (reporting a problem if it is required or mistyped)."""
        key, label = self.key(canonical), self.label(canonical)
        if key not in self.obj or (self.obj[key] is None and not required):
            if required:
                what = "a non-empty string" if nonempty else "a string"
                self.errors.append(f"missing field {label}: expected {what}")
            return None
        value = self.obj[key]
        if not isinstance(value, str):
            self.errors.append(f"{label} is {_type_name(value)}: expected a string")
            return None
        if nonempty and not value.strip():
            self.errors.append(f"{label} is empty: expected a non-empty string")
            return None
        return value


def _check_turns(messages: list[Message]) -> list[str]:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return ["conversation has no assistant turn: expected at least one assistant reply"]
    if roles[-1] != "assistant":
        return [f'conversation ends on a "{roles[-1]}" turn: expected it to end on an assistant reply']
    return []


def _normalize_alpaca(obj: dict, columns: dict[str, str]) -> tuple[list[Message], list[str]]:
    errors: list[str] = []
    f = _Fields(obj, columns, errors)
    instruction = f.string("instruction", required=True)
    inp = f.string("input", required=False)
    output = f.string("output", required=True, nonempty=True)
    system = f.string("system", required=False)
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": system})

    history_key = f.key("history")
    history = obj.get(history_key)
    if history is not None:
        label = f.label("history")
        if not isinstance(history, list):
            errors.append(f"{label} is {_type_name(history)}: expected a list of [user, assistant] string pairs")
        else:
            for i, pair in enumerate(history):
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                    shown = f"{_type_name(pair)} of length {len(pair)}" if isinstance(pair, list) else _type_name(pair)
                    errors.append(f"{label}[{i}] is {shown}: expected a [user, assistant] pair of strings")
                    continue
                messages.append({"role": "user", "content": pair[0]})
                messages.append({"role": "assistant", "content": pair[1]})

    if instruction is not None and not instruction.strip() and not (inp or "").strip():
        errors.append(f"{f.label('instruction')} and {f.label('input')} are both empty: expected a non-empty prompt")
    if errors or instruction is None or output is None:
        return [], errors
    if not inp:
        prompt = instruction
    elif not instruction:
        prompt = inp
    else:
        prompt = instruction + "\n" + inp
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": output})
    return messages, errors


def _normalize_list(
    items: Any, label: str, role_key: str, content_key: str, role_map: dict[str, str]
) -> tuple[list[Message], list[str]]:
    """Validate a list of turn objects and map them to messages (shared by messages and sharegpt)."""
    messages, errors = turn_list(items, label, role_key, content_key, role_map)
    if errors:
        return [], errors
    return messages, _check_turns(messages)


def turn_list(
    items: Any,
    label: str,
    role_key: str,
    content_key: str,
    role_map: dict[str, str],
    final: str = "an assistant reply",
) -> tuple[list[Message], list[str]]:
    """A list of turn objects validated one by one (roles, content, the system message only first) and mapped to
    messages, without a rule on which turn ends it; ``final`` says what should (for the messages of an empty list)."""
    item_desc = f'{{"{role_key}", "{content_key}"}} objects'
    if not isinstance(items, list):
        return [], [f"{label} is {_type_name(items)}: expected a list of {item_desc}"]
    if not items:
        return [], [f"{label} is empty: expected a list of {item_desc} ending on {final}"]
    errors: list[str] = []
    messages: list[Message] = []
    allowed = ", ".join(f'"{r}"' for r in role_map)
    for i, item in enumerate(items):
        where = f"{label}[{i}]"
        if not isinstance(item, dict):
            errors.append(f'{where} is {_type_name(item)}: expected an object with "{role_key}" and "{content_key}"')
            continue
        role = None
        if role_key not in item:
            errors.append(f'{where} has no "{role_key}": expected one of {allowed}')
        elif not isinstance(item[role_key], str) or item[role_key] not in role_map:
            value = item[role_key]
            # containers by type only: a deeply nested one would overflow json.dumps
            shown = _type_name(value) if isinstance(value, (list, dict)) else json.dumps(value, ensure_ascii=False)
            hint = " (function calling is not supported)" if value in TOOL_ROLES else ""
            errors.append(f"{where}.{role_key} is {shown}: expected one of {allowed}{hint}")
        else:
            role = role_map[item[role_key]]
        errors += [f'{where} has "{k}": {NO_TOOLS}' for k in TOOL_FIELDS if k in item]
        content = item.get(content_key)
        if content_key not in item:
            errors.append(f'{where} has no "{content_key}": expected a string')
        elif not isinstance(content, str):
            errors.append(f"{where}.{content_key} is {_type_name(content)}: expected a string")
            content = None
        if role == "system" and i > 0:
            errors.append(f"{where} is a system message at position {i}: expected the system message only first")
        if role == "assistant" and isinstance(content, str) and not content.strip():
            errors.append(f"{where} (assistant) is empty: expected a non-empty reply")
        if role is not None and isinstance(content, str):
            messages.append({"role": role, "content": content})
    if errors:
        return [], errors
    return messages, []


def _normalize_messages(obj: dict, columns: dict[str, str]) -> tuple[list[Message], list[str]]:
    f = _Fields(obj, columns, [])
    key, label = f.key("messages"), f.label("messages")
    if key not in obj:
        return [], [f'missing field {label}: expected a list of {{"role", "content"}} objects']
    return _normalize_list(obj[key], label, "role", "content", {r: r for r in ROLES})


def _normalize_sharegpt(obj: dict, columns: dict[str, str]) -> tuple[list[Message], list[str]]:
    errors: list[str] = []
    f = _Fields(obj, columns, errors)
    system = f.string("system", required=False)
    key, label = f.key("conversations"), f.label("conversations")
    if key not in obj:
        return [], [*errors, f'missing field {label}: expected a list of {{"from", "value"}} objects']
    messages, list_errors = _normalize_list(obj[key], label, "from", "value", SHAREGPT_FROM)
    errors += list_errors
    if errors:
        return [], errors
    if system:
        if messages[0]["role"] == "system":
            return [], [f"both {f.label('system')} and a system turn in {label}: expected the system prompt only once"]
        messages.insert(0, {"role": "system", "content": system})
    return messages, []


_NORMALIZERS = {"alpaca": _normalize_alpaca, "messages": _normalize_messages, "sharegpt": _normalize_sharegpt}


# ---------------------------------------------------------------------------------------------------------------------
# Public entry points


def _read_items(path: Path, problems: _Problems) -> list[tuple[int, int, Any]]:
    text, bad_lines = _read_text(path, problems)
    start = len(text) - len(text.lstrip())
    if start < len(text) and text[start] == "[":
        return _parse_array(text, start, problems)
    return _parse_jsonl(text, bad_lines, problems)


def read_json_file(path: str | Path) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """Read a JSON array or JSONL file exactly as :func:`load_records` does, without validating the records.

    The file must be a regular file within the input size limit (see :mod:`chatlora.files`), in UTF-8; JSONL lines
    are split on ``\\n`` only (U+2028 inside a string is fine). Values nested too deeply, numbers too long for
    Python and strings with lone surrogates are problems of their line, like invalid JSON.

    Returns:
        ``(line, value)`` for every value read and ``(line, problem)`` for every broken line, in file order; the
        caller adds its own problems and raises them with :meth:`DataError.at`.

    Raises:
        DataError: If the file cannot be read at all (missing, not a regular file, too big, UTF-16).
    """
    problems = _Problems(str(path))
    items = _read_items(Path(path), problems)
    return [(line, value) for line, _, value in items], list(problems.items)


def load_records(path: str | Path, format: str = "auto", columns: dict[str, str] | None = None) -> list[Record]:
    """Read a dataset (JSON array or JSONL), validate it and return normalized records.

    The layout is a JSON array if the first non-whitespace character is ``[``, else JSONL. With ``format="auto"`` the
    record format is detected from the first record that is a JSON object (see :func:`detect_format`).

    Args:
        path: Dataset file; problems are reported with ``str(path)``.
        format: One of :data:`FORMATS`.
        columns: Canonical field name -> field name in the file (see :func:`parse_columns`).

    Returns:
        The records, in file order.

    Raises:
        DataError: Listing every problem found (unreadable file, bad UTF-8, bad JSON, invalid records, empty file).
        ConfigError: If ``format`` or ``columns`` is invalid.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
    cols = _check_columns(columns)
    problems = _Problems(str(path))
    items = _read_items(Path(path), problems)
    if not items and not problems:
        problems.add(1, "dataset is empty: expected at least one record")

    fmt: str | None = None if format == "auto" else format
    origin = "as requested"
    if fmt is None:
        first = next(((line, obj) for line, _, obj in items if isinstance(obj, dict)), None)
        if first is not None:
            line, obj = first
            fmt = detect_format(obj, cols)
            origin = f"detected from line {line}"
            if fmt is None:
                keys = ", ".join(f'"{k}"' for k in list(obj)[:8]) or "none"
                problems.add(
                    line,
                    f'cannot detect the dataset format (keys: {keys}): expected a "messages" key (messages), '
                    '"conversations" (sharegpt) or "instruction"/"output" (alpaca); map other names with columns',
                )

    records: list[Record] = []
    for line, index, obj in items:
        if not isinstance(obj, dict):
            problems.add(line, f"record is {_type_name(obj)}: expected a JSON object")
            continue
        if fmt is None:
            continue
        found = detect_format(obj, cols)
        if found is not None and found != fmt:
            problems.add(line, f"record is in {found} format: expected {fmt} format ({origin})")
            continue
        messages, errors = _NORMALIZERS[fmt](obj, cols)
        errors = [f'record has "{k}": {NO_TOOLS}' for k in TOOL_FIELDS if k in obj] + errors
        for error in errors:
            problems.add(line, error)
        if not errors:
            records.append(Record(messages=messages, line=line, index=index))
    if problems:
        raise problems.error()
    return records


def _nearest_rank(sorted_values: list[int], percent: int) -> int:
    """Nearest-rank percentile: the smallest value with at least ``percent``% of values <= it (0 if empty)."""
    if not sorted_values:
        return 0
    rank = max(1, -(-percent * len(sorted_values) // 100))  # ceil without float error
    return sorted_values[rank - 1]


def describe(records: list[Record]) -> dict:
    """Summarize a dataset.

    Returns:
        ``records``, ``messages`` (total), ``assistant_turns`` (total), ``turns_per_record`` (``min``/``mean``/``max``
        of assistant turns per record), ``records_with_system``, ``duplicates`` (records whose messages exactly equal
        an earlier record's) and ``assistant_chars`` (``p50``/``p95``/``max`` characters per assistant reply,
        nearest-rank percentiles).
    """
    turns: list[int] = []
    reply_chars: list[int] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    duplicates = with_system = messages = 0
    for record in records:
        messages += len(record.messages)
        replies = [len(m["content"]) for m in record.messages if m["role"] == "assistant"]
        turns.append(len(replies))
        reply_chars += replies
        with_system += bool(record.messages) and record.messages[0]["role"] == "system"
        key = tuple((m["role"], m["content"]) for m in record.messages)
        if key in seen:
            duplicates += 1
        seen.add(key)
    reply_chars.sort()
    return {
        "records": len(records),
        "messages": messages,
        "assistant_turns": sum(turns),
        "turns_per_record": {
            "min": min(turns, default=0),
            "mean": sum(turns) / len(turns) if turns else 0.0,
            "max": max(turns, default=0),
        },
        "records_with_system": int(with_system),
        "duplicates": duplicates,
        "assistant_chars": {
            "p50": _nearest_rank(reply_chars, 50),
            "p95": _nearest_rank(reply_chars, 95),
            "max": reply_chars[-1] if reply_chars else 0,
        },
    }


def _quoted(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


@dataclass(frozen=True)
class SystemPrompts:
    """The system prompts a run's records are trained with: the data's own, and one added to the records without.

    Attributes:
        records: Records in the dataset.
        with_own: Records that carry their own system message.
        data_prompts: The distinct system prompts the data carries, in order of first appearance.
        added: The prompt added to the records that carry none (None: they train without one).
        added_from: Where ``added`` comes from, for the plan line ("--system-prompt", "the character card", ...).
    """

    records: int
    with_own: int
    data_prompts: tuple[str, ...]
    added: str | None
    added_from: str = "--system-prompt"

    @classmethod
    def of(cls, records: list[Record], added: str | None, added_from: str = "--system-prompt") -> SystemPrompts:
        own = [r.messages[0]["content"] for r in records if r.messages and r.messages[0]["role"] == "system"]
        return cls(len(records), len(own), tuple(dict.fromkeys(own)), added or None, added_from)

    @property
    def trained(self) -> tuple[str, ...]:
        """The distinct system prompts in the trained conversations (records without one and nothing added: none)."""
        extra = (self.added,) if self.added and self.with_own < self.records else ()
        return tuple(dict.fromkeys(self.data_prompts + extra))

    @property
    def single(self) -> str | None:
        """The one system prompt the run was trained with, if there was exactly one (what chat adds by default)."""
        return self.trained[0] if len(self.trained) == 1 else None

    @property
    def kind(self) -> str:
        """What the data carried: ``none``, ``one`` (a shared prompt) or ``several`` (per conversation)."""
        return ("none", "one")[len(self.data_prompts)] if len(self.data_prompts) < 2 else "several"

    def line(self) -> str:
        """The plan line: which system prompt the records train with."""
        n, own, without = self.records, self.with_own, self.records - self.with_own
        rest = ""
        if own and without:
            rest = (
                f"; {_quoted(self.added)} ({self.added_from}) added to the other {without}"
                if self.added
                else f"; the other {without} have none"
            )
        if not self.trained:
            return "system prompt: none (the data has none; pass --system-prompt to add one)"
        if not own:
            return f"system prompt: {_quoted(self.added)} ({self.added_from}, added to all {n} records)"
        if self.single is not None:
            return f"system prompt: {_quoted(self.single)} (the data's own, in {own} of {n} records{rest})"
        return (
            f"system prompt: per conversation ({len(self.trained)} distinct; the data's own in {own} of {n} "
            f"records{rest})"
        )

    def to_dict(self) -> dict[str, Any]:
        """For the run card: what the data carried and what was added (the prompts themselves only when one)."""
        return {
            "data": self.kind,
            "data_distinct": len(self.data_prompts),
            "records": self.records,
            "records_with_own": self.with_own,
            "added": self.added,
            "trained_distinct": len(self.trained),
            "trained": self.single,
        }


def length_stats(lengths: list[int], max_length: int | None) -> dict:
    """Summarize token lengths.

    Percentiles use the nearest-rank method (the value at rank ``ceil(p/100 * n)`` of the sorted lengths), so they
    are always actual lengths. All values are 0 for an empty list.

    Returns:
        ``count``, ``p50``, ``p95``, ``max``, ``mean`` and ``truncated`` (how many lengths exceed ``max_length``;
        0 if it is None).
    """
    ordered = sorted(lengths)
    return {
        "count": len(ordered),
        "p50": _nearest_rank(ordered, 50),
        "p95": _nearest_rank(ordered, 95),
        "max": ordered[-1] if ordered else 0,
        "mean": sum(ordered) / len(ordered) if ordered else 0.0,
        "truncated": 0 if max_length is None else sum(1 for n in ordered if n > max_length),
    }

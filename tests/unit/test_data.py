"""Unit tests for chatlora.data: dataset reading, validation, normalization and stats."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest

from chatlora.data import (
    FORMATS,
    DataError,
    Record,
    describe,
    detect_format,
    length_stats,
    load_records,
    parse_columns,
)

REPO = Path(__file__).resolve().parents[2]
HUANHUAN = REPO / "data" / "huanhuan.json"


def write(tmp_path: Path, content: str | bytes, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def problems_of(path: Path, **kwargs: object) -> list[str]:
    with pytest.raises(DataError) as info:
        load_records(path, **kwargs)
    return info.value.problems


ALPACA = {"instruction": "hi", "input": "", "output": "hello"}
USER_ASSISTANT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


# ----------------------------------------------------------------------------------------------------------------------
# Happy paths and normalization


def test_real_huanhuan_file_loads_fast_with_first_record_on_line_2():
    """Guards against slow array scanning (quadratic line counting) and wrong normalization of the real dataset."""
    start = time.perf_counter()
    records = load_records(HUANHUAN)
    elapsed = time.perf_counter() - start
    assert len(records) == 3729
    assert records[0].messages == [
        {"role": "user", "content": "娘娘。"},
        {"role": "assistant", "content": "你放心，本宫到任何时候都不会自轻自贱委屈了这孩子。"},
    ]
    assert records[0].line == 2
    assert records[0].index == 0
    assert records[1].line == 7
    assert [r.index for r in records[:3]] == [0, 1, 2]
    assert elapsed < 1.0


def test_alpaca_normalization_with_system_history_and_input(tmp_path):
    """Guards against dropping the system prompt / history or joining instruction and input wrongly."""
    rec = {
        "system": "You are Zhen Huan.",
        "history": [["q1", "a1"], ["q2", "a2"]],
        "instruction": "Translate",
        "input": "bonjour",
        "output": "hello",
    }
    (record,) = load_records(write(tmp_path, jsonl(rec)))
    assert record.messages == [
        {"role": "system", "content": "You are Zhen Huan."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "Translate\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]
    assert record == Record(messages=record.messages, line=1, index=0)


def test_alpaca_missing_input_and_null_optionals_are_accepted(tmp_path):
    """Guards against treating optional alpaca fields (absent or null) as errors."""
    path = write(
        tmp_path, jsonl({"instruction": "a", "output": "b"}, {"instruction": "c", "input": None, "output": "d"})
    )
    records = load_records(path)
    assert [r.messages[0]["content"] for r in records] == ["a", "c"]


def test_alpaca_empty_instruction_uses_input(tmp_path):
    """Guards against a user message with a leading newline when only "input" carries the prompt."""
    (record,) = load_records(write(tmp_path, jsonl({"instruction": "", "input": "question", "output": "x"})))
    assert record.messages[0] == {"role": "user", "content": "question"}


def test_messages_format(tmp_path):
    """Guards against the OpenAI messages format being rejected or altered."""
    msgs = [{"role": "system", "content": "sys"}, *USER_ASSISTANT]
    (record,) = load_records(write(tmp_path, jsonl({"messages": msgs})))
    assert record.messages == msgs


def test_messages_extra_keys_are_dropped(tmp_path):
    """Guards against leaking extra per-message keys (e.g. "name") into normalized messages."""
    msgs = [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "yo", "weight": 1}]
    (record,) = load_records(write(tmp_path, jsonl({"messages": msgs})))
    assert record.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_sharegpt_format_maps_roles_and_system(tmp_path):
    """Guards against wrong from->role mapping or a lost sharegpt "system" field."""
    rec = {
        "system": "be nice",
        "conversations": [
            {"from": "human", "value": "a"},
            {"from": "gpt", "value": "b"},
            {"from": "user", "value": "c"},
            {"from": "assistant", "value": "d"},
        ],
    }
    (record,) = load_records(write(tmp_path, jsonl(rec)))
    assert record.messages == [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]


def test_sharegpt_system_turn_first(tmp_path):
    """Guards against rejecting a sharegpt conversation that starts with a system turn."""
    conv = [{"from": "system", "value": "s"}, {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    (record,) = load_records(write(tmp_path, jsonl({"conversations": conv})))
    assert record.messages[0] == {"role": "system", "content": "s"}


def test_json_array_element_lines_compact_and_pretty(tmp_path):
    """Guards against wrong LINE for array elements (several per line, pretty-printed, blank lines)."""
    text = '[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"},\n\n  {\n    "instruction": "e",\n    "output": "f"\n  }\n]\n'
    records = load_records(write(tmp_path, text, "d.json"))
    assert [(r.line, r.index) for r in records] == [(1, 0), (1, 1), (3, 2)]


def test_jsonl_blank_lines_skipped_and_lines_kept(tmp_path):
    """Guards against blank JSONL lines being errors or shifting record line numbers."""
    text = "\n" + json.dumps(ALPACA) + "\n   \n\n" + json.dumps(ALPACA) + "\n\n"
    records = load_records(write(tmp_path, text))
    assert [(r.line, r.index) for r in records] == [(2, 0), (5, 1)]


def test_jsonl_crlf_line_endings(tmp_path):
    """Guards against Windows line endings breaking JSONL parsing."""
    path = write(tmp_path, (json.dumps(ALPACA) + "\r\n") * 2 + "\r\n")
    assert [r.line for r in load_records(path)] == [1, 2]


def test_bom_is_stripped_for_array_and_jsonl(tmp_path):
    """Guards against a UTF-8 BOM making JSON parsing (or array detection) fail."""
    bom = b"\xef\xbb\xbf"
    arr = write(tmp_path, bom + json.dumps([ALPACA]).encode(), "a.json")
    lines = write(tmp_path, bom + jsonl(ALPACA, ALPACA).encode(), "b.jsonl")
    assert len(load_records(arr)) == 1
    assert [r.line for r in load_records(lines)] == [1, 2]


def test_explicit_format(tmp_path):
    """Guards against an explicit format being ignored or rejected for a matching file."""
    path = write(tmp_path, jsonl({"messages": USER_ASSISTANT}))
    assert load_records(path, format="messages")[0].messages == USER_ASSISTANT
    assert FORMATS == ("auto", "alpaca", "messages", "sharegpt")


def test_invalid_format_argument():
    """Guards against a typo in the format silently falling back to auto-detection."""
    with pytest.raises(ValueError, match="unknown format 'alpacca'"):
        load_records("whatever.json", format="alpacca")


# ----------------------------------------------------------------------------------------------------------------------
# Column mappings


def test_parse_columns():
    """Guards against mis-parsing the --columns spec (whitespace, trailing comma, empty)."""
    assert parse_columns("instruction=prompt,output=response") == {"instruction": "prompt", "output": "response"}
    assert parse_columns(" instruction = q , output = a , ") == {"instruction": "q", "output": "a"}
    assert parse_columns(None) == {}
    assert parse_columns("  ") == {}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("instruction", "expected CANONICAL=NAME"),
        ("instruction=", "expected CANONICAL=NAME"),
        ("=prompt", "expected CANONICAL=NAME"),
        ("question=prompt", "unknown column 'question'.*expected one of instruction, input, output"),
        ("output=a,output=b", "mapped twice"),
        ("instruction=x,output=x", "both map to 'x'"),
    ],
)
def test_parse_columns_errors(spec, match):
    """Guards against bad --columns specs being accepted silently."""
    with pytest.raises(ValueError, match=match):
        parse_columns(spec)


def test_load_records_rejects_unknown_canonical_column(tmp_path):
    """Guards against a typo in a columns dict being ignored."""
    path = write(tmp_path, jsonl(ALPACA))
    with pytest.raises(ValueError, match="unknown column 'outptu'"):
        load_records(path, columns={"outptu": "response"})


def test_alpaca_column_mapping_and_error_names_file_field(tmp_path):
    """Guards against the mapping not being applied, and errors naming the canonical instead of the file's field."""
    cols = parse_columns("instruction=prompt,output=response,input=context")
    ok = write(tmp_path, jsonl({"prompt": "p", "context": "c", "response": "r"}), "ok.jsonl")
    assert load_records(ok, columns=cols)[0].messages == [
        {"role": "user", "content": "p\nc"},
        {"role": "assistant", "content": "r"},
    ]
    bad = write(tmp_path, jsonl({"prompt": "p"}), "bad.jsonl")
    assert problems_of(bad, columns=cols) == [
        f'{bad}:1: missing field "response" (output): expected a non-empty string'
    ]


def test_messages_and_sharegpt_column_mapping(tmp_path):
    """Guards against the messages/conversations/system keys not honoring the mapping."""
    p1 = write(tmp_path, jsonl({"turns": USER_ASSISTANT}), "m.jsonl")
    assert load_records(p1, columns={"messages": "turns"})[0].messages == USER_ASSISTANT
    conv = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    p2 = write(tmp_path, jsonl({"chat": conv, "persona": "s"}), "s.jsonl")
    records = load_records(p2, columns={"conversations": "chat", "system": "persona"})
    assert records[0].messages[0] == {"role": "system", "content": "s"}


# ----------------------------------------------------------------------------------------------------------------------
# Format detection


def test_detect_format():
    """Guards against wrong detection priority or ignoring the column mapping."""
    assert detect_format({"messages": []}, None) == "messages"
    assert detect_format({"conversations": []}, {}) == "sharegpt"
    assert detect_format({"instruction": "x"}, None) == "alpaca"
    assert detect_format({"output": "x"}, None) == "alpaca"
    assert detect_format({"prompt": "x"}, None) is None
    assert detect_format({"prompt": "x"}, {"instruction": "prompt"}) == "alpaca"
    assert detect_format({"turns": []}, {"messages": "turns"}) == "messages"
    assert detect_format(["not", "a", "dict"], None) is None  # type: ignore[arg-type]


def test_format_detected_from_first_object_record(tmp_path):
    """Guards against detection looking at a non-object first record and giving up."""
    path = write(tmp_path, "[1,\n" + json.dumps({"messages": USER_ASSISTANT}) + "]", "d.json")
    assert problems_of(path) == [f"{path}:1: record is int: expected a JSON object"]


def test_undetectable_format(tmp_path):
    """Guards against an unknown layout producing a confusing error per field instead of one clear message."""
    path = write(tmp_path, jsonl({"q": "a", "a": "b"}, {"q": "c", "a": "d"}))
    (problem,) = problems_of(path)
    assert problem.startswith(
        f'{path}:1: cannot detect the dataset format (keys: "q", "a"): expected a "messages" key'
    )


def test_record_of_other_format_names_expected_format(tmp_path):
    """Guards against mixed-format files loading silently or giving confusing missing-field errors."""
    conv = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    path = write(tmp_path, jsonl(ALPACA, ALPACA, {"conversations": conv}))
    assert problems_of(path) == [
        f"{path}:3: record is in sharegpt format: expected alpaca format (detected from line 1)"
    ]
    assert problems_of(path, format="messages")[0] == (
        f"{path}:1: record is in alpaca format: expected messages format (as requested)"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Field validation


def test_missing_output(tmp_path):
    """Guards against a record without "output" loading as an empty reply."""
    path = write(tmp_path, jsonl(ALPACA, {"instruction": "x"}))
    assert problems_of(path) == [f'{path}:2: missing field "output": expected a non-empty string']


def test_missing_instruction(tmp_path):
    """Guards against a record without "instruction" being accepted."""
    path = write(tmp_path, jsonl({"output": "x"}))
    assert problems_of(path) == [f'{path}:1: missing field "instruction": expected a string']


def test_mistyped_fields(tmp_path):
    """Guards against non-string values being str()-ed into the training text."""
    path = write(tmp_path, jsonl({"instruction": ["a"], "input": 3, "output": 5, "system": None}))
    assert problems_of(path) == [
        f'{path}:1: "instruction" is array: expected a string',
        f'{path}:1: "input" is int: expected a string',
        f'{path}:1: "output" is int: expected a string',
    ]


def test_null_output_is_mistyped(tmp_path):
    """Guards against a required null field being treated as missing-but-fine."""
    path = write(tmp_path, jsonl({"instruction": "a", "output": None}))
    assert problems_of(path) == [f'{path}:1: "output" is null: expected a string']


def test_empty_output(tmp_path):
    """Guards against training on empty (or whitespace-only) assistant replies."""
    path = write(tmp_path, jsonl(ALPACA, {"instruction": "a", "output": "  "}))
    assert problems_of(path) == [f'{path}:2: "output" is empty: expected a non-empty string']


def test_empty_prompt(tmp_path):
    """Guards against a user turn with no text at all."""
    path = write(tmp_path, jsonl({"instruction": "", "input": "", "output": "x"}))
    assert problems_of(path) == [f'{path}:1: "instruction" and "input" are both empty: expected a non-empty prompt']


def test_bad_history(tmp_path):
    """Guards against malformed alpaca history entries crashing or being silently dropped."""
    path = write(tmp_path, jsonl({**ALPACA, "history": [["a", "b"], ["only one"], "x"]}, {**ALPACA, "history": "no"}))
    assert problems_of(path) == [
        f'{path}:1: "history"[1] is array of length 1: expected a [user, assistant] pair of strings',
        f'{path}:1: "history"[2] is string: expected a [user, assistant] pair of strings',
        f'{path}:2: "history" is string: expected a list of [user, assistant] string pairs',
    ]


def test_messages_field_errors(tmp_path):
    """Guards against malformed messages lists (wrong type, empty, non-object items, non-string content)."""
    path = write(
        tmp_path,
        jsonl(
            {"messages": "hi"},
            {"messages": []},
            {"messages": ["hi", {"role": "user"}, {"role": "assistant", "content": [{"type": "text"}]}]},
        ),
    )
    assert problems_of(path) == [
        f'{path}:1: "messages" is string: expected a list of {{"role", "content"}} objects',
        f'{path}:2: "messages" is empty: expected a list of {{"role", "content"}} objects ending on an assistant reply',
        f'{path}:3: "messages"[0] is string: expected an object with "role" and "content"',
        f'{path}:3: "messages"[1] has no "content": expected a string',
        f'{path}:3: "messages"[2].content is array: expected a string',
    ]


def test_messages_missing_key_with_explicit_format(tmp_path):
    """Guards against an explicit messages format accepting records without "messages"."""
    path = write(tmp_path, jsonl({"foo": 1}))
    assert problems_of(path, format="messages") == [
        f'{path}:1: missing field "messages": expected a list of {{"role", "content"}} objects'
    ]


def test_unknown_role(tmp_path):
    """Guards against unknown roles (e.g. "bot") reaching the chat template."""
    msgs = [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]
    path = write(tmp_path, jsonl({"messages": USER_ASSISTANT}, {"messages": msgs}))
    assert problems_of(path) == [
        f'{path}:2: "messages"[1].role is "bot": expected one of "system", "user", "assistant"'
    ]


def test_unknown_sharegpt_from(tmp_path):
    """Guards against unknown sharegpt speakers being mapped to a wrong role."""
    conv = [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]
    path = write(tmp_path, jsonl({"conversations": conv}))
    assert problems_of(path) == [
        f'{path}:1: "conversations"[1].from is "bot": expected one of "human", "user", "gpt", "assistant", "system"'
    ]


def test_sharegpt_missing_value_and_from(tmp_path):
    """Guards against sharegpt turns without "from"/"value" crashing with KeyError."""
    conv = [{"value": "a"}, {"from": "gpt"}]
    path = write(tmp_path, jsonl({"conversations": conv}))
    assert problems_of(path) == [
        f'{path}:1: "conversations"[0] has no "from": expected one of "human", "user", "gpt", "assistant", "system"',
        f'{path}:1: "conversations"[1] has no "value": expected a string',
    ]


def test_sharegpt_system_twice(tmp_path):
    """Guards against two system prompts when both the field and a system turn are given."""
    conv = [{"from": "system", "value": "s"}, {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    path = write(tmp_path, jsonl({"system": "t", "conversations": conv}))
    assert problems_of(path) == [
        f'{path}:1: both "system" and a system turn in "conversations": expected the system prompt only once'
    ]


def test_conversation_must_end_on_assistant(tmp_path):
    """Guards against training on a conversation whose last turn is the user's (nothing to learn at the end)."""
    msgs = [*USER_ASSISTANT, {"role": "user", "content": "more?"}]
    path = write(tmp_path, jsonl({"messages": msgs}))
    assert problems_of(path) == [
        f'{path}:1: conversation ends on a "user" turn: expected it to end on an assistant reply'
    ]


def test_conversation_without_assistant(tmp_path):
    """Guards against conversations with no assistant turn at all (zero training signal)."""
    conv = [{"from": "human", "value": "a"}]
    path = write(tmp_path, jsonl({"conversations": conv}))
    assert problems_of(path) == [
        f"{path}:1: conversation has no assistant turn: expected at least one assistant reply"
    ]


def test_system_not_first(tmp_path):
    """Guards against a system message in the middle of a conversation."""
    msgs = [USER_ASSISTANT[0], {"role": "system", "content": "s"}, USER_ASSISTANT[1]]
    path = write(tmp_path, jsonl({"messages": msgs}))
    assert problems_of(path) == [
        f'{path}:1: "messages"[1] is a system message at position 1: expected the system message only first'
    ]


def test_empty_assistant_content(tmp_path):
    """Guards against empty assistant messages in the messages format."""
    msgs = [USER_ASSISTANT[0], {"role": "assistant", "content": ""}]
    path = write(tmp_path, jsonl({"messages": msgs}))
    assert problems_of(path) == [f'{path}:1: "messages"[1] (assistant) is empty: expected a non-empty reply']


# ----------------------------------------------------------------------------------------------------------------------
# File-level problems


def test_file_not_found(tmp_path):
    """Guards against a raw traceback (or a fake line number) for a missing file."""
    path = tmp_path / "nope.json"
    assert problems_of(path) == [f"{path}: file not found"]


def test_directory_instead_of_file(tmp_path):
    """Guards against a confusing OSError when a directory is passed."""
    (problem,) = problems_of(tmp_path)
    assert problem.startswith(f"{tmp_path}: ")


@pytest.mark.parametrize("content", ["", "  \n\n\t\n", "[]", " [ \n ] \n", b"\xef\xbb\xbf"])
def test_empty_dataset(tmp_path, content):
    """Guards against an empty dataset loading as zero records (and training on nothing)."""
    path = write(tmp_path, content, "d.json")
    assert problems_of(path) == [f"{path}:1: dataset is empty: expected at least one record"]


def test_broken_jsonl_line_reported_and_others_checked(tmp_path):
    """Guards against stopping at the first broken JSONL line (or losing its line number)."""
    text = (
        json.dumps(ALPACA)
        + "\n"
        + '{"instruction": "a", "output": \n'
        + "\n"
        + json.dumps({"instruction": "x"})
        + "\n"
    )
    path = write(tmp_path, text)
    assert problems_of(path) == [
        f"{path}:2: invalid JSON: Expecting value (column 32): expected one JSON object per line",
        f'{path}:4: missing field "output": expected a non-empty string',
    ]


def test_jsonl_non_object_line(tmp_path):
    """Guards against a JSONL line holding a scalar/array being treated as a record."""
    path = write(tmp_path, jsonl(ALPACA, [1, 2], "text"))
    assert problems_of(path) == [
        f"{path}:2: record is array: expected a JSON object",
        f"{path}:3: record is string: expected a JSON object",
    ]


def test_array_element_not_object(tmp_path):
    """Guards against array elements that are not objects crashing the loader."""
    path = write(tmp_path, '[\n  {"instruction": "a", "output": "b"},\n  "oops",\n  null\n]\n', "d.json")
    assert problems_of(path) == [
        f"{path}:3: record is string: expected a JSON object",
        f"{path}:4: record is null: expected a JSON object",
    ]


def test_pretty_printed_single_object(tmp_path):
    """Guards against a single multi-line JSON object producing one confusing JSON error per line."""
    path = write(tmp_path, json.dumps(ALPACA, indent=2), "d.json")
    assert problems_of(path) == [
        f"{path}:1: the file is one JSON object spread over several lines: "
        "expected a JSON array of records or one JSON object per line (JSONL)"
    ]


def test_array_syntax_error_reports_its_line_and_stops(tmp_path):
    """Guards against a wrong line for a syntax error inside a JSON array, or cascading errors after it."""
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c",\n   "output" "d"},\n  {"x": 1}\n]\n'
    path = write(tmp_path, text, "d.json")
    assert problems_of(path) == [
        f"{path}:4: invalid JSON: Expecting ':' delimiter (column 13): expected a valid JSON array"
    ]


def test_array_records_before_syntax_error_are_still_validated(tmp_path):
    """Guards against losing validation problems of records that precede a syntax error."""
    text = '[\n{"instruction": "a"},\n{"instruction": "c", "output": "d"} x\n]'
    path = write(tmp_path, text, "d.json")
    assert problems_of(path) == [
        f'{path}:2: missing field "output": expected a non-empty string',
        f"{path}:3: invalid JSON: found 'x' after a record: expected ',' or ']'",
    ]


def test_truncated_array_after_element(tmp_path):
    """Guards against a file cut after a complete record (missing ']') loading as if complete."""
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d"}\n\n'
    path = write(tmp_path, text, "d.json")
    assert problems_of(path) == [f"{path}:3: truncated JSON array: expected ',' or ']' after the last record"]


def test_truncated_array_after_comma(tmp_path):
    """Guards against a file cut right after a ',' loading silently."""
    path = write(tmp_path, '[\n  {"instruction": "a", "output": "b"},\n', "d.json")
    assert problems_of(path) == [
        f"{path}:2: truncated JSON array: expected a record or ']' before the end of the file"
    ]


@pytest.mark.parametrize("tail", ['{"instruction": "c", "out', '{"instruction": "c",\n "output":'])
def test_truncated_array_inside_record(tmp_path, tail):
    """Guards against a file cut inside a record being reported as an ordinary syntax error on a wrong line."""
    path = write(tmp_path, '[\n{"instruction": "a", "output": "b"},\n' + tail, "d.json")
    last = 3 + tail.count("\n")
    assert problems_of(path) == [
        f"{path}:{last}: truncated JSON array: the file ends inside the record starting at line 3: "
        "expected the rest of the record and a closing ']'"
    ]


def test_trailing_comma_and_trailing_content(tmp_path):
    """Guards against JSON5-style trailing commas or garbage after ']' being accepted."""
    p1 = write(tmp_path, '[\n{"instruction": "a", "output": "b"},\n]', "a.json")
    assert problems_of(p1) == [f"{p1}:3: invalid JSON: trailing comma before ']': expected another record after ','"]
    p2 = write(tmp_path, '[{"instruction": "a", "output": "b"}]\n\n]', "b.json")
    assert problems_of(p2) == [f"{p2}:3: unexpected content after the JSON array: expected the end of the file"]
    p3 = write(tmp_path, "[]\nx", "c.json")
    assert problems_of(p3) == [f"{p3}:2: unexpected content after the JSON array: expected the end of the file"]


def test_invalid_utf8_every_bad_line_reported(tmp_path):
    """Guards against a UnicodeDecodeError traceback without a line, or reporting only the first bad line."""
    good = json.dumps(ALPACA).encode()
    bad3 = b'{"ins\xfftruction": "a", "output": "b"}'
    bad5 = '{"instruction": "é'.encode() + b'\xc3", "output": "b"}'
    data = b"\n".join([good, good, bad3, good, bad5, b'{"instruction": "x"}']) + b"\n"
    path = write(tmp_path, data)
    assert problems_of(path) == [
        f"{path}:3: invalid UTF-8 (byte 0xff at column 6): the file must be UTF-8",
        f"{path}:5: invalid UTF-8 (byte 0xc3 at column 20): the file must be UTF-8",
        f'{path}:6: missing field "output": expected a non-empty string',
    ]


def test_invalid_utf8_in_array(tmp_path):
    """Guards against invalid UTF-8 inside a JSON array file going unreported."""
    data = b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "\xff", "output": "b"}\n]\n'
    path = write(tmp_path, data, "d.json")
    assert problems_of(path) == [f"{path}:3: invalid UTF-8 (byte 0xff at column 18): the file must be UTF-8"]


def test_utf16_file(tmp_path):
    """Guards against a UTF-16 file producing one invalid-UTF-8 problem per line."""
    path = write(tmp_path, json.dumps([ALPACA]).encode("utf-16"), "d.json")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}:1: file is UTF-16") and problem.endswith("the file must be UTF-8")


def test_problems_are_sorted_by_line(tmp_path):
    """Guards against problems from different passes (UTF-8, JSON, validation) coming out of line order."""
    data = b'{"instruction": "x"}\n{broken\n\xff\n'
    path = write(tmp_path, data)
    assert [p.split(":")[1] for p in problems_of(path)] == ["1", "2", "3"]


def test_problem_cap_in_message(tmp_path):
    """Guards against a huge error message for a badly broken file, while keeping all problems available."""
    path = write(tmp_path, "{bad\n" * 60)
    with pytest.raises(DataError) as info:
        load_records(path)
    err = info.value
    assert len(err.problems) == 60
    lines = str(err).split("\n")
    assert len(lines) == 51
    assert lines[0].startswith(f"{path}:1: invalid JSON")
    assert lines[49].startswith(f"{path}:50: ")
    assert lines[-1] == "... and 10 more problems"


def test_data_error_str_and_pickle():
    """Guards against DataError losing its problems when printed or sent across processes."""
    err = DataError(["a:1: x", "a:2: y"])
    assert str(err) == "a:1: x\na:2: y"
    clone = pickle.loads(pickle.dumps(err))
    assert clone.problems == err.problems


# ----------------------------------------------------------------------------------------------------------------------
# Stats


def _rec(*pairs: tuple[str, str], system: str | None = None) -> Record:
    msgs = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return Record(messages=msgs, line=1, index=0)


def test_describe():
    """Guards against wrong dataset stats (turn counts, system count, duplicates, reply length percentiles)."""
    records = [
        _rec(("a", "xx")),
        _rec(("a", "xx")),  # duplicate of the first
        _rec(("a", "xx"), system="s"),  # not a duplicate: has a system message
        _rec(("b", "yyyy"), ("c", "z")),
        _rec(("a", "xx")),  # second duplicate
    ]
    stats = describe(records)
    assert stats == {
        "records": 5,
        "messages": 2 + 2 + 3 + 4 + 2,
        "assistant_turns": 6,
        "turns_per_record": {"min": 1, "mean": 6 / 5, "max": 2},
        "records_with_system": 1,
        "duplicates": 2,
        "assistant_chars": {"p50": 2, "p95": 4, "max": 4},
    }


def test_describe_empty():
    """Guards against describe() crashing on an empty list."""
    stats = describe([])
    assert stats["records"] == 0
    assert stats["turns_per_record"] == {"min": 0, "mean": 0.0, "max": 0}
    assert stats["assistant_chars"] == {"p50": 0, "p95": 0, "max": 0}


def test_length_stats_nearest_rank():
    """Guards against interpolated (non-nearest-rank) percentiles and off-by-one truncation counts."""
    lengths = list(range(1, 21))  # 1..20, shuffled order must not matter
    stats = length_stats(list(reversed(lengths)), max_length=18)
    assert stats == {"count": 20, "p50": 10, "p95": 19, "max": 20, "mean": 10.5, "truncated": 2}
    assert length_stats([5, 1, 3], None) == {"count": 3, "p50": 3, "p95": 5, "max": 5, "mean": 3.0, "truncated": 0}
    assert length_stats([7], 7)["truncated"] == 0


def test_length_stats_empty():
    """Guards against length_stats() crashing on no data."""
    assert length_stats([], 10) == {"count": 0, "p50": 0, "p95": 0, "max": 0, "mean": 0.0, "truncated": 0}


def test_token_length_stats_counts_what_training_encodes(tokenizer):
    """Guards against `data check` counting other tokens than training sees: without the system prompt training
    adds, or the lengths after truncation instead of before (then nothing is ever reported as too long)."""
    from chatlora.template import encode_conversation, token_length_stats, with_system

    conversations = [
        [{"role": "user", "content": "问" * n}, {"role": "assistant", "content": "答"}] for n in (1, 5, 30)
    ]
    expected = sorted(len(encode_conversation(with_system(m, "系统"), tokenizer).input_ids) for m in conversations)
    stats = token_length_stats(conversations, tokenizer, "系统", max_length=expected[1])
    assert (stats["count"], stats["max"], stats["p50"]) == (3, expected[2], expected[1])
    assert stats["truncated"] == 1 and stats["max_length"] == expected[1]
    assert token_length_stats(conversations, tokenizer, None, None)["max"] == expected[2] - len(
        encode_conversation([{"role": "system", "content": "系统"}], tokenizer).input_ids
    )

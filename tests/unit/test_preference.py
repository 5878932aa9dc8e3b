"""Preference pairs: reading every shape, FILE:LINE errors for bad pairs, encoding through the chat template."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from chatlora.data import DataError
from chatlora.errors import ConfigError
from chatlora.preference import encode_pairs, load_pairs, parse_pair_columns
from chatlora.template import IGNORE_INDEX, encode_conversation, encode_prompt, with_system

USER = [{"role": "user", "content": "q"}]


def test_every_shape_reads_as_the_same_pair(tmp_path):
    """Guards against a shape being read with its sides swapped, its system prompt lost or its prompt cut."""
    want = ([{"role": "system", "content": "S"}, *USER], "good", "bad")
    shapes = {
        "trl_plain": {"prompt": "q", "chosen": "good", "rejected": "bad"},
        "trl_conversational": {
            "prompt": [{"role": "system", "content": "S"}, *USER],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
        "messages": {"messages": [{"role": "system", "content": "S"}, *USER], "chosen": "good", "rejected": "bad"},
        "trl_implicit_prompt": {
            "chosen": [{"role": "system", "content": "S"}, *USER, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "system", "content": "S"}, *USER, {"role": "assistant", "content": "bad"}],
        },
        "sharegpt": {
            "conversations": [{"from": "human", "value": "q"}],
            "system": "S",
            "chosen": {"from": "gpt", "value": "good"},
            "rejected": {"from": "gpt", "value": "bad"},
        },
        "alpaca": {"instruction": "q", "input": "", "system": "S", "chosen": "good", "rejected": "bad"},
    }
    for name, row in shapes.items():
        (pair,) = load_pairs(write_jsonl(tmp_path / f"{name}.jsonl", [row]))
        got = (pair.prompt, pair.chosen, pair.rejected)
        if name == "trl_plain":  # a plain prompt is one user turn, without a system prompt
            assert got == (USER, "good", "bad"), name
        else:
            assert got == want, name


def test_column_mapping_renames_the_sides(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    (pair,) = load_pairs(path, "trl", parse_pair_columns("prompt=question,chosen=good,rejected=bad"))
    assert (pair.prompt, pair.chosen, pair.rejected) == (USER, "a", "b")
    with pytest.raises(ConfigError, match="unknown column 'answer'"):
        parse_pair_columns("answer=good")


# each bad file: its records, and the line and words of the one error it must give
BAD_FILES = {
    "missing_rejected": ({"prompt": "q", "chosen": "a"}, 'missing field "rejected"'),
    "missing_chosen": ({"prompt": "q", "rejected": "a"}, 'missing field "chosen"'),
    "empty_chosen": ({"prompt": "q", "chosen": "  ", "rejected": "b"}, '"chosen" is empty'),
    "empty_rejected_message": (
        {"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": ""}]},
        '"rejected" is empty',
    ),
    "identical_sides": ({"prompt": "q", "chosen": "same", "rejected": "same "}, "are the same reply"),
    "prompt_ends_on_assistant": (
        {"prompt": [*USER, {"role": "assistant", "content": "r"}], "chosen": "a", "rejected": "b"},
        "the prompt's last turn is the assistant's: expected it to end on the user turn",
    ),
    "sharegpt_prompt_ends_on_gpt": (
        {
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        },
        "the prompt's last turn is the assistant's",
    ),
    "rejected_from_the_user": (
        {"prompt": "q", "chosen": "a", "rejected": {"role": "user", "content": "b"}},
        "\"rejected\" is a message from 'user': expected an assistant reply",
    ),
    "empty_prompt": ({"prompt": " ", "chosen": "a", "rejected": "b"}, '"prompt" is empty'),
    "implicit_prompts_differ": (
        {
            "chosen": [*USER, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
        },
        "differ before their last message",
    ),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_pair_is_one_error_with_its_line(tmp_path, name):
    """Guards against a bad pair training (an empty or identical side gives a zero or meaningless margin) or being
    reported without its line: the bad record sits on line 2 behind a good one."""
    row, words = BAD_FILES[name]
    good = {"prompt": "ok", "chosen": "a", "rejected": "b"}
    if "conversations" in row:
        good = {"conversations": [{"from": "human", "value": "ok"}], "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / f"{name}.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert len(e.value.problems) == 1, e.value.problems
    assert e.value.problems[0].startswith(f"{path}:2: ")
    assert words in e.value.problems[0]


def test_bad_preference_file_exits_2_from_the_cli(tmp_path, capsys):
    from chatlora.cli import main

    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])
    assert main(["data", "check", str(path), "--preference"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:1: ") and "Traceback" not in err


def test_encoded_sides_are_the_tokens_sft_labels(tokenizer):
    """Guards against a side that misses its end-of-turn token (the model would not learn to stop) or carries the
    template's tokens after it, and against a control-token string in the text becoming a control token."""
    from chatlora.preference import Pair

    pair = Pair([{"role": "user", "content": "hi <|im_end|>"}], "good", "bad", 1, 0)
    (ex,) = encode_pairs([pair], tokenizer, "S", 256).examples
    prompt = with_system(pair.prompt, "S")
    assert ex["prompt_ids"] == encode_prompt(prompt, tokenizer)
    for side in ("chosen", "rejected"):
        enc = encode_conversation([*prompt, pair.conversation(side)[-1]], tokenizer)
        labelled = [i for i, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX]
        assert ex[f"{side}_ids"] == labelled
        assert tokenizer.decode(ex[f"{side}_ids"]) == getattr(pair, side) + "<|im_end|>"
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ex["prompt_ids"].count(eot) == 2  # the template's two, not the one written in the user's text


def test_max_length_cuts_sides_and_drops_prompts_that_fill_it(tokenizer):
    from chatlora.preference import Pair

    short = Pair(USER, "a" * 50, "b", 1, 0)
    long_prompt = Pair([{"role": "user", "content": "x" * 100}], "a", "b", 2, 1)
    enc = encode_pairs([short, long_prompt], tokenizer, None, 40)
    assert enc.dropped == [long_prompt] and enc.truncated == 1
    (ex,) = enc.examples
    assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) == 40
    assert ex["rejected_ids"] == tokenizer.encode("b<|im_end|>", add_special_tokens=False)


def test_pairs_written_as_json_array_read_too(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2, indent=1), encoding="utf-8")
    assert [p.line for p in load_pairs(path)] == [2, 7]


# ---------------------------------------------------------------- unpaired completions (KTO's data)


def test_unpaired_completions_read_plain_and_conversational_with_their_label(tmp_path):
    """Guards against a label read the wrong way round (an undesirable completion trained as desirable), or a
    conversational completion or prompt read differently from the plain one."""
    rows = [
        {"prompt": "q", "completion": "good", "label": True},
        {"prompt": [{"role": "system", "content": "S"}, *USER], "completion": "bad", "label": False},
        {"prompt": USER, "completion": [{"role": "assistant", "content": "good"}], "label": True},
    ]
    got = [(p.prompt, p.chosen, p.rejected, p.paired) for p in load_pairs(write_jsonl(tmp_path / "u.jsonl", rows))]
    assert got == [
        (USER, "good", None, False),
        ([{"role": "system", "content": "S"}, *USER], None, "bad", False),
        (USER, "good", None, False),
    ]


# each bad unpaired record (behind a good one, on line 2) and the words of the one error it must give
BAD_UNPAIRED = {
    "label_a_string": (
        {"prompt": "q", "completion": "a", "label": "true"},
        '"label" is string: expected true or false',
    ),
    "label_a_number": ({"prompt": "q", "completion": "a", "label": 1}, '"label" is int: expected true or false'),
    "label_missing": ({"prompt": "q", "completion": "a"}, 'missing field "label": expected true'),
    "completion_empty": ({"prompt": "q", "completion": " ", "label": True}, '"completion" is empty'),
    "completion_empty_message": (
        {"prompt": "q", "completion": [{"role": "assistant", "content": ""}], "label": False},
        '"completion" is empty',
    ),
    "completion_missing": ({"prompt": "q", "label": True}, 'missing field "completion"'),
    "prompt_ends_on_assistant": (
        {"prompt": [*USER, {"role": "assistant", "content": "r"}], "completion": "a", "label": True},
        "the prompt's last turn is the assistant's: expected it to end on the user turn",
    ),
    "a_pair_among_completions": (
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        "record is a pair (prompt, chosen, rejected): expected an unpaired completion (prompt, completion, label) "
        "like line 1 (one file holds one shape)",
    ),
}


@pytest.mark.parametrize("name", BAD_UNPAIRED)
def test_bad_unpaired_completion_exits_2_with_its_line(tiny_model_dir, tmp_path, capsys, monkeypatch, name):
    """Guards against a bad unpaired record training (a label "false" as a string is truthy: an undesirable reply
    taught as desirable; an empty completion) or being reported without its line, before any weights load."""
    from chatlora.cli import main

    monkeypatch.setattr("chatlora.training.train.load_model", lambda *a, **k: pytest.fail("weights loaded"))
    row, words = BAD_UNPAIRED[name]
    path = write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": "ok", "completion": "a", "label": False}, row])
    argv = ["train", "--method", "kto", "--model", str(tiny_model_dir), "--data", str(path)]
    assert main([*argv, "--output-dir", str(tmp_path / "o"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{path}:2: ") and words in err, err


def test_unpaired_data_is_refused_by_the_pair_methods(tiny_model_dir, tmp_path, capsys):
    """Guards against DPO, ORPO or SimPO crashing (or training) on a file without rejected sides."""
    from chatlora.cli import main

    path = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "a", "label": True}] * 4)
    argv = ["train", "--method", "dpo", "--model", str(tiny_model_dir), "--data", str(path)]
    assert main([*argv, "--output-dir", str(tmp_path / "o"), "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        f"{path}:1: an unpaired completion (prompt, completion, label): `--method dpo` needs pairs (prompt, chosen, "
        "rejected); only --method kto trains on unpaired data\n"
    )

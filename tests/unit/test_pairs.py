"""`chatlora pairs`: self-play pairs from an SFT dataset, persona negatives, the held-out records left out, and a
journal that loses nothing when a run stops half-way."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from chatlora.cli import main
from chatlora.data import load_records
from chatlora.errors import FileError
from chatlora.eval.persona import Persona
from chatlora.inference.infer import ChatModel
from chatlora.pairs import build_pairs
from chatlora.preference import load_pairs
from chatlora.settings import SamplingConfig

GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0)
PERSONA = Persona("甄嬛", ["臣妾"], ["AI"], ["Hugging Face"])


@pytest.fixture
def sft_data(tmp_path):
    rows = [{"instruction": f"问题{i}", "input": "", "output": f"臣妾回答{i}。"} for i in range(6)]
    return write_jsonl(tmp_path / "sft.jsonl", rows)


@pytest.fixture
def chat(tiny_model_dir):
    return ChatModel.load(model=str(tiny_model_dir), device="cpu")


def test_pairs_hold_the_dataset_reply_and_the_models_own(chat, sft_data, tmp_path):
    """Guards against swapped sides, a prompt that is not what the model answered, and a file train cannot read."""
    out = tmp_path / "pairs.jsonl"
    result = build_pairs(chat, load_records(sft_data), out, str(sft_data), GREEDY, PERSONA, system="S")
    pairs = load_pairs(out)
    records = load_records(sft_data)
    assert result.written == len(pairs) == 6 - sum(result.skipped.values())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row, pair in zip(rows, pairs, strict=True):
        record = records[row["source"]["index"]]
        assert pair.prompt == [{"role": "system", "content": "S"}, *record.messages[:-1]]
        assert pair.chosen == record.messages[-1]["content"]
        assert pair.rejected == chat.generate(record.messages[:-1], GREEDY, system="S").text


def test_persona_negatives_and_held_out_records(chat, sft_data, tmp_path):
    out = tmp_path / "pairs.jsonl"
    records = load_records(sft_data)
    result = build_pairs(chat, records, out, str(sft_data), GREEDY, PERSONA, persona_negatives=True, exclude={0, 1})
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    negatives = [r for r in rows if r["source"]["kind"] == "persona"]
    assert result.held_out == 2 and {r["source"]["index"] for r in rows} == {2, 3, 4, 5}
    assert len(negatives) == 4 and all(PERSONA.leaks(r["rejected"][0]["content"]) for r in negatives)
    assert all("Hugging Face" in r["rejected"][0]["content"] for r in negatives)


def test_a_stopped_run_keeps_its_pairs_and_resume_adds_only_the_missing(chat, sft_data, tmp_path, monkeypatch):
    """Guards against a crash losing finished pairs, a torn last line breaking the file, and a resume writing a
    pair twice."""
    out = tmp_path / "pairs.jsonl"
    records = load_records(sft_data)
    real = ChatModel.generate_many

    def stop_after_three(self, conversations, sampling, on_reply, **kw):
        kw["systems"] = kw["systems"][:3]
        real(self, conversations[:3], sampling, on_reply=on_reply, **kw)
        raise KeyboardInterrupt  # the process dies after three replies were delivered

    monkeypatch.setattr(ChatModel, "generate_many", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        build_pairs(chat, records, out, str(sft_data), GREEDY, PERSONA)
    monkeypatch.setattr(ChatModel, "generate_many", real)
    assert len(load_pairs(out)) == 3
    with out.open("a") as f:
        f.write('{"prompt": [{"role": "us')  # a crash in the middle of a write
    with pytest.raises(FileError, match="already exists: pass --resume"):
        build_pairs(chat, records, out, str(sft_data), GREEDY, PERSONA)
    result = build_pairs(chat, records, out, str(sft_data), GREEDY, PERSONA, resume=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert result.resumed == 3 and len(rows) == 3 + result.written
    assert sorted(r["source"]["index"] for r in rows) == sorted({r["source"]["index"] for r in rows})


def test_cli_pairs_exits_2_on_an_existing_output(tiny_model_dir, sft_data, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    out.write_text("mine\n")
    argv = ["pairs", "--model", str(tiny_model_dir), "--data", str(sft_data), "--output", str(out), "--device", "cpu"]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "mine\n"

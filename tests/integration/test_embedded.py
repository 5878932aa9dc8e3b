"""The real embedded SmolLM2-135M-Instruct, through the CLI: overfit a few Huanhuan records, then use the adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HUANHUAN = ROOT / "data" / "huanhuan.json"


def cli(*args: str, timeout: int = 900, input: str | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "chatlora", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, embedded_model_dir):
    """Three short Huanhuan records, trained for a few dozen steps with a high learning rate."""
    records = json.loads(HUANHUAN.read_text(encoding="utf-8"))
    short = sorted(records[:400], key=lambda r: len(r["instruction"]) + len(r["output"]))[5:8]
    tmp = tmp_path_factory.mktemp("overfit")
    data = write_jsonl(tmp / "few.jsonl", short)
    out = tmp / "run"
    cli(
        "train",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "30",
        "--batch-size",
        "3",
        "--val-size",
        "0",
        "--lr",
        "3e-3",
        "--lora-r",
        "16",
        "--lora-dropout",
        "0",
        "--warmup-ratio",
        "0",
        "--lr-scheduler",
        "constant",
        "--logging-steps",
        "1",
        "--save-steps",
        "1000",
        "--max-length",
        "128",
    )
    return short, out


def test_training_loss_falls_clearly(overfit):
    """Guards against a pipeline that runs but does not learn (wrong labels, frozen LoRA, wrong lr)."""
    _, out = overfit
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 30
    assert losses[-1] < 0.2 * losses[0], losses


def test_greedy_generation_returns_trained_reply_and_stops(overfit):
    """Guards against a prompt mismatch between training and inference, or generation not stopping at <|im_end|>."""
    from chatlora.inference.infer import ChatModel, SamplingConfig

    records, out = overfit
    chat = ChatModel.load(adapter=out)
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.0, max_new_tokens=96)
    replies = chat.generate_batch([[{"role": "user", "content": r["instruction"]}] for r in records], greedy)
    for record, reply in zip(records, replies, strict=True):
        assert reply.text == record["output"]
        assert reply.finish_reason == "stop"


def test_cli_chat_generate_merge(overfit, tmp_path):
    """Guards against the CLI commands breaking on the real model (chat, generate, merge, chat on merged)."""
    records, out = overfit
    first = records[0]
    greedy = ("--temperature", "0", "--repetition-penalty", "1.0")
    said = cli("chat", "--adapter", str(out), "--prompt", first["instruction"], *greedy).stdout
    assert said.strip() == first["output"]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": r["instruction"], "n": i} for i, r in enumerate(records)])
    replies = tmp_path / "r.jsonl"
    cli("generate", "--adapter", str(out), "--input", str(prompts), "--output", str(replies), *greedy)
    rows = [json.loads(line) for line in replies.read_text().splitlines()]
    assert [r["reply"] for r in rows] == [r["output"] for r in records]
    assert {r["finish_reason"] for r in rows} == {"stop"}
    merged = tmp_path / "merged"
    cli("merge", "--adapter", str(out), "--output", str(merged))
    said = cli("chat", "--model", str(merged), "--prompt", first["instruction"], *greedy).stdout
    assert said.strip() == first["output"]


def test_data_check_on_shipped_data():
    """Guards against the shipped dataset (or its reader) breaking: 3,729 records, token stats with SmolLM2."""
    proc = cli("data", "check", str(HUANHUAN), "--json")
    stats = json.loads(proc.stdout)
    assert stats["records"] == 3729
    assert stats["tokens"]["max"] >= stats["tokens"]["p95"] >= stats["tokens"]["p50"] > 0

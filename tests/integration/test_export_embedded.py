"""The embedded SmolLM2, tuned for a few steps, exported to GGUF f16, q8_0 and as a LoRA GGUF; parity must pass."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from conftest import write_jsonl

from chatlora.export import parse_modelfile
from chatlora.model import embedded_gguf

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HUANHUAN = ROOT / "data" / "huanhuan.json"
CHECK = ("--samples", "8", "--max-new-tokens", "12")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chatlora", *args], capture_output=True, text=True, timeout=1800, cwd=ROOT
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Twenty-four short Huanhuan records, eight of them held out, trained for four steps."""
    records = json.loads(HUANHUAN.read_text(encoding="utf-8"))
    short = sorted(records[:400], key=lambda r: len(r["instruction"]) + len(r["output"]))[:24]
    tmp = tmp_path_factory.mktemp("export-embedded")
    data = write_jsonl(tmp / "few.jsonl", short)
    out = tmp / "run"
    proc = cli(
        "train",
        *("--data", str(data), "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4"),
        *("--val-size", "8", "--lr", "2e-3", "--lora-dropout", "0", "--max-length", "128"),
        *("--logging-steps", "1", "--eval-steps", "1000", "--save-steps", "1000"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def rows(stdout: str) -> dict[str, str]:
    """The parity table's ``{check: result}``."""
    cells = [re.split(r"\s{2,}", line, maxsplit=2) for line in stdout.split("check ", 1)[1].splitlines()[2:]]
    return {c[0]: c[1] for c in cells if len(c) == 3 and c[1] in ("PASS", "FAIL", "SKIP")}


@pytest.mark.parametrize("quant, mib", [("f16", (250, 275)), ("q8_0", (130, 150))])
def test_export_reloads_and_replies_like_the_adapter(run, tmp_path, quant, mib):
    """Guards against a GGUF of the real model that loads but answers, prompts or stops unlike the adapter."""
    out = tmp_path / quant
    proc = cli("export", "--adapter", str(run), "--output", str(out), "--quant", quant, *CHECK)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    result = rows(proc.stdout)
    assert {k for k, v in result.items() if v != "PASS"} <= {"llama.cpp (llama-server)", "Ollama"}, proc.stdout
    assert "greedy replies" in result and "Modelfile TEMPLATE (Go)" in result
    path = out / f"run-{quant}.gguf"
    assert mib[0] < path.stat().st_size / 2**20 < mib[1]
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the split the adapter's tokenizer used
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2  # <|im_end|>
    print(proc.stdout)  # the parity table, for the record (pytest -s)


def test_lora_only_export_names_the_embedded_base(run, tmp_path):
    """Guards against a LoRA GGUF whose Modelfile points at another base than the one the adapter was tuned on."""
    out = tmp_path / "lora"
    proc = cli("export", "--adapter", str(run), "--output", str(out), "--lora-only", *CHECK)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    mf = parse_modelfile((out / "Modelfile").read_text())
    assert mf["FROM"] == str(embedded_gguf()) and mf["ADAPTER"] == "./run-lora-f16.gguf"
    assert rows(proc.stdout)["top-1 agreement"] == "PASS"

"""Data-parallel training through torchrun (2 CPU processes, gloo) on a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import write_jsonl


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_processes_rank0_writes_and_adapter_loads(tiny_model_dir, tmp_path, mode):
    """Guards against every rank writing logs/checkpoints, duplicated data, or an unloadable DDP-saved adapter."""
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": f"q{i}", "input": "", "output": "嗯。"} for i in range(18)]
    )
    out = tmp_path / "run"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NCCL_NVLS_ENABLE": "0"}
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "chatlora.cli", "train",
         "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--epochs", "1",
         "--batch-size", "2", "--val-size", "2", "--logging-steps", "1", "--eval-steps", "2", "--save-steps", "2",
         "--device", "cpu", *(["--fsdp"] if mode == "fsdp" else [])],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "chatlora.json").read_text())
    assert card["hardware"]["world_size"] == 2 and card["hardware"]["distributed"] == mode
    # 16 training records, 2 per process per step, 2 processes: 4 steps, so the data is sharded, not duplicated
    assert card["results"]["global_step"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4], "one metrics line per step: rank 0 only"
    assert proc.stdout.count("adapter:") == 1, "only rank 0 prints the summary"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    from peft import PeftModel

    from chatlora.model import load_model

    model = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(out))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5]])).logits).all()

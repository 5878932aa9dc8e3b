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


def test_torchrun_packed_counts_every_ranks_tokens(tiny_model_dir, tmp_path):
    """Guards against a tokens/s that is rank 0's count times the world size: with packing, ranks get micro-batches
    of different sizes, and tokens_seen must be the exact sum over ranks (here: every conversation once)."""
    from chatlora.data import load_records
    from chatlora.model import load_tokenizer
    from chatlora.training.train import encode_records

    rows = [{"instruction": "q" * (130 + 5 * i), "input": "", "output": "嗯。" * (i % 3 + 1)} for i in range(16)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, _, _ = encode_records(load_records(data), load_tokenizer(str(tiny_model_dir)), "S", 256)
    assert len({len(ex["input_ids"]) for ex in examples}) > 8  # micro-batches differ in size between ranks
    out = tmp_path / "run"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "chatlora.cli", "train",
         "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--epochs", "1",
         "--packing", "--max-length", "256", "--tokens-per-batch", "256", "--system-prompt", "S",
         "--val-size", "0", "--logging-steps", "1", "--save-steps", "100", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "chatlora.json").read_text())
    assert card["results"]["global_step"] == 8  # one conversation per micro-batch, 16 micro-batches over 2 ranks
    assert card["results"]["tokens_seen"] == sum(len(ex["input_ids"]) for ex in examples)


EQUIV = """
import json, os, sys
from chatlora.config import TrainConfig
from chatlora.training.train import train
bs, ga, out, data, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
label_only = sys.argv[6] == "label-only"
r = train(TrainConfig(model=model, data=data, output_dir=out, max_steps=3, batch_size=bs, grad_accum=ga, val_size=0,
    logging_steps=1, save_steps=100, device="cpu", lora_dropout=0.0, lr=1e-2, warmup_ratio=0, group_by_length=False,
    max_grad_norm=1e9, system_prompt="S", packing=False, logits_at_labels=label_only, dtype="fp32"))
if int(os.environ.get("RANK", 0)) == 0:
    s = sum(p.double().abs().sum().item() for n, p in r.model.named_parameters() if "lora_B" in n)
    print("LORA_B", repr(s), flush=True)
"""


@pytest.mark.parametrize("head", ["full-vocab", "label-only"])
def test_ddp_equals_grad_accumulation_equals_one_big_batch(tiny_model_dir, tmp_path, head):
    """Guards against DDP or grad accumulation mis-normalising the loss: with every step seeing all 8 records,
    2 processes x 4, 1 process x 4 x accum 2 and 1 process x 8 must train the same LoRA weights and losses; with the
    label-only head too (under DDP through the wrapper's forward: a head that bypassed DDP's hooks would leave each
    rank's gradients un-averaged)."""
    rows = [{"instruction": f"q{i}" * (i + 1), "input": "", "output": "嗯。" * (i + 1)} for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    script = tmp_path / "equiv.py"
    script.write_text(EQUIV, encoding="utf-8")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        "bs8": [sys.executable],
        "accum2": [sys.executable],
        "ddp2": [torchrun, "--standalone", "--nproc-per-node", "2"],
    }
    sizes = {"bs8": ("8", "1"), "accum2": ("4", "2"), "ddp2": ("4", "1")}
    weights, losses = {}, {}
    for name, launcher in runs.items():
        out = tmp_path / name
        args = [str(script), *sizes[name], str(out), str(data), str(tiny_model_dir), head]
        proc = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[name] = float(next(line for line in proc.stdout.splitlines() if line.startswith("LORA_B")).split()[1])
        rows_ = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows_ if "loss" in r]
    assert weights["accum2"] == pytest.approx(weights["bs8"], rel=1e-6)
    assert weights["ddp2"] == pytest.approx(weights["bs8"], rel=1e-6)
    assert losses["accum2"] == pytest.approx(losses["bs8"], rel=1e-6)
    assert losses["ddp2"] == pytest.approx(losses["bs8"], rel=1e-6)
    if head == "label-only":  # the label-only path must have run under DDP, not the full head
        card = json.loads((tmp_path / "ddp2" / "chatlora.json").read_text())
        assert card["plan"]["logits_at_labels"] is True


def test_torchrun_resume_continues_exactly(tiny_model_dir, tmp_path):
    """Guards against --resume under torchrun restarting the data, the optimizer or the curve: 2 processes resumed
    from step 2 of 4 must end with the same losses and LoRA weights as the uninterrupted run."""
    from safetensors.torch import load_file

    rows = [{"instruction": f"q{i}" * (i % 4 + 1), "input": "", "output": "嗯。" * (i % 3 + 1)} for i in range(24)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, *extra):
        proc = subprocess.run(
            [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "chatlora.cli", "train",
             "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "4",
             "--save-steps", "2", "--batch-size", "2", "--val-size", "0", "--logging-steps", "1", "--lr", "1e-2",
             "--lora-dropout", "0", "--system-prompt", "S", "--device", "cpu", *extra],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full")
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoint-2", resumed_dir / "checkpoint-2")
    shutil.copy(tmp_path / "full" / "metrics.jsonl", resumed_dir / "metrics.jsonl")  # as a crash after step 4 left it
    resumed = run(resumed_dir, "--resume")
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed if "loss" in r] == pytest.approx([r["loss"] for r in full if "loss" in r])
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(resumed_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_one_process_on_several_gpus_does_not_fall_back_to_data_parallel(monkeypatch, caplog, tmp_path):
    """Guards against the HF Trainer's nn.DataParallel: one process seeing N GPUs would silently train an N-times
    larger batch (slowly). chatlora trains on one GPU and says how to launch on all."""
    from chatlora.config import TrainConfig
    from chatlora.model import pick_precision
    from chatlora.training.plan import BatchPlan, RunPlan
    from chatlora.training.train import training_args

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = TrainConfig(model="m", data="d", output_dir=str(tmp_path), dtype="fp32", batch_size=8)
    precision = pick_precision(torch.device("cpu"), "fp32")
    batches = BatchPlan("padded", 1, 10, 8 * 384, 8 * 100, 8 * 100, 8.0, 1200.0)
    plan = RunPlan("cuda", "fp32", None, False, False, False, False, False, 1, batches, None, None, True)
    with caplog.at_level("WARNING"):
        args = training_args(cfg, precision, torch.device("cuda"), False, plan)
    assert args.n_gpu == 1 and args.train_batch_size == 8
    assert "2 GPUs are visible" in caplog.text and "torchrun --nproc-per-node 2" in caplog.text

"""Table for bench/multi_gpu.sh: steady-state tokens/s (after step 10), per-GPU peak memory, losses by step."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/multi_gpu")
rows = {}
for name in ("single", "ddp2", "fsdp2", "single_ga2"):
    card_path, metrics_path = out / name / "chatlora.json", out / name / "metrics.jsonl"
    if not card_path.is_file():
        print(f"{name}: no run card (failed)")
        continue
    card = json.loads(card_path.read_text())
    logs = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    logs = [r for r in logs if "loss" in r]
    warm = next(r for r in logs if r["step"] >= 10)
    last = logs[-1]
    tps = (last["tokens_seen"] - warm["tokens_seen"]) / (last["time"] - warm["time"])
    rows[name] = {
        "world_size": card["hardware"]["world_size"],
        "tokens_per_s": round(tps),
        "peak_gib_rank0": card["hardware"]["peak_gpu_memory_gib"],
        "loss_by_step": {r["step"]: round(r["loss"], 4) for r in logs},
    }
print("| run | GPUs | real tok/s (steps 10-end) | peak GiB / GPU | loss at steps |")
print("|---|---|---|---|---|")
for name, r in rows.items():
    losses = ", ".join(f"{s}: {v}" for s, v in r["loss_by_step"].items())
    print(f"| {name} | {r['world_size']} | {r['tokens_per_s']} | {r['peak_gib_rank0']} | {losses} |")
if "single" in rows and "ddp2" in rows:
    print(f"ddp2 / single tokens/s: {rows['ddp2']['tokens_per_s'] / rows['single']['tokens_per_s']:.2f}x")
if "fsdp2" in rows and "ddp2" in rows:
    print(f"fsdp2 / ddp2 peak memory: {rows['fsdp2']['peak_gib_rank0']} vs {rows['ddp2']['peak_gib_rank0']} GiB")
(out / "summary.json").write_text(json.dumps(rows, indent=1))

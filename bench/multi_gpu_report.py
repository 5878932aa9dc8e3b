"""Table for bench/multi_gpu.sh: steady-state tokens/s (after step 10), per-GPU peak memory, losses by step, and
how far the 2-GPU losses sit from 1 GPU at the same global batch, against the drift between two data orders."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/multi_gpu")
rows = {}
for name in ("single", "ddp2", "ddp2_accel", "fsdp2", "single_ga2", "single_ga2_data1"):
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
        "distributed": card["hardware"]["distributed"],
        "precision": card["hardware"]["precision"],
        "tokens_per_s": round(tps),
        "tokens_seen": last["tokens_seen"],
        "tokens_per_step": round(last["tokens_seen"] / last["step"]),
        "peak_gib_rank0": card["hardware"]["peak_gpu_memory_gib"],
        "loss_by_step": {r["step"]: round(r["loss"], 4) for r in logs},
    }
print("| run | GPUs | mode | real tok/s (steps 10-end) | tokens / step | peak GiB / GPU | loss at steps |")
print("|---|---|---|---|---|---|---|")
for name, r in rows.items():
    losses = ", ".join(f"{s}: {v}" for s, v in r["loss_by_step"].items())
    print(
        f"| {name} | {r['world_size']} | {r['distributed'] or '-'} ({r['precision']}) | {r['tokens_per_s']} "
        f"| {r['tokens_per_step']} | {r['peak_gib_rank0']} | {losses} |"
    )


def gap(a: str, b: str) -> float | None:
    """Largest |loss difference| over the logged steps from step 10 on."""
    if a not in rows or b not in rows:
        return None
    la, lb = rows[a]["loss_by_step"], rows[b]["loss_by_step"]
    return max(abs(la[s] - lb[s]) for s in la if s >= 10 and s in lb)


summary = {"runs": rows}
for two in ("ddp2", "ddp2_accel"):
    if "single" in rows and two in rows:
        summary[f"{two}_speedup"] = rows[two]["tokens_per_s"] / rows["single"]["tokens_per_s"]
        print(f"{two} / single tokens/s: {summary[f'{two}_speedup']:.2f}x")
if "fsdp2" in rows and "ddp2" in rows:
    print(f"fsdp2 / ddp2 peak memory: {rows['fsdp2']['peak_gib_rank0']} vs {rows['ddp2']['peak_gib_rank0']} GiB")
noise = gap("single_ga2", "single_ga2_data1")
for two in ("ddp2", "ddp2_accel", "fsdp2"):
    g = gap(two, "single_ga2")
    if g is not None:
        summary[f"{two}_vs_single_ga2_max_gap"] = g
        print(f"{two} vs single_ga2 (same global batch): max |loss gap| from step 10 = {g:.4f}")
if noise is not None:
    summary["data_order_drift_max_gap"] = noise
    print(f"single_ga2 vs single_ga2_data1 (another data order): max |loss gap| from step 10 = {noise:.4f}")
(out / "summary.json").write_text(json.dumps(summary, indent=1))

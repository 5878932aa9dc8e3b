"""Issue 30: the quickstart across seeds, precisions and machines, every target of every run in one table.

    python3 bench/quickstart_seeds.py --out DIR RUN [RUN ...] [--parallel N] [--threads T] [-- FLAG ...]
    python3 bench/quickstart_seeds.py --out DIR --table          # the table of the runs already in DIR

A RUN is ``NAME`` or ``NAME:key=value,key=value`` (config overrides as `chatlora quickstart` flags take them, e.g.
``s1:seed=1`` or ``fp32-s2:seed=2,dtype=fp32``). Each run is ``chatlora quickstart --config
configs/quickstart-cpu.yaml --output-dir DIR/NAME`` plus its overrides and the FLAGs after ``--``, in its own
process with ``T`` threads (default: all cores when one run at a time, else cores / N). Its printed output goes to
``DIR/NAME.log``. The table reads each run's ``chatlora.json`` and ``eval/metrics.json``: training and eval time,
precision, every target with its verdict, and the figures behind them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart-cpu.yaml"


def parse_run(spec: str) -> tuple[str, list[str]]:
    name, _, rest = spec.partition(":")
    flags = []
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        flags += [f"--{key.replace('_', '-')}", value]
    return name, flags


def run_one(out: Path, name: str, flags: list[str], extra: list[str], threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "chatlora", "quickstart", "--config", str(CONFIG), "--output-dir", str(out / name)]
    cmd += ["--overwrite", *flags, *extra]
    start = time.time()
    with (out / f"{name}.log").open("w", encoding="utf-8") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.time() - start
    (out / name / "wall_s.txt").write_text(f"{wall:.1f}\n", encoding="utf-8")
    return wall


def row(run_dir: Path) -> dict | None:
    card_path, metrics_path = run_dir / "chatlora.json", run_dir / "eval" / "metrics.json"
    if not (card_path.is_file() and metrics_path.is_file()):
        return None
    card, metrics = json.loads(card_path.read_text()), json.loads(metrics_path.read_text())
    wall = run_dir / "wall_s.txt"
    replies, loss, sig = metrics["replies"], metrics["loss"], metrics.get("significance", {}).get("chrF", {})
    verdict = {
        t["name"]: "INFO" if t["passed"] is None else "PASS" if t["passed"] else "FAIL" for t in metrics["targets"]
    }
    details = {t["name"]: f"{verdict[t['name']]} {t['detail']}" for t in metrics["targets"]}
    return {
        "run": run_dir.name,
        "seed": card["config"].get("seed"),
        "train precision": card["hardware"]["precision"],
        "eval dtype": metrics["settings"].get("dtype", "?"),
        "lora_layers": card["config"].get("lora_layers", 0),
        "steps": card["results"].get("global_step"),
        "train s": card["results"].get("train_runtime_s") or card["results"].get("train_runtime"),
        "eval s": metrics["settings"].get("runtime_s"),
        "wall s": float(wall.read_text()) if wall.is_file() else None,
        "loss ratio": round(loss["ratio"], 3),
        "stop tuned": f"{replies['tuned']['stop_rate']:.1%} of {replies['tuned']['n']}",
        "chrF base -> tuned (p)": f"{sig.get('base', 0):.2f} -> {sig.get('tuned', 0):.2f} (p = {sig.get('p_value', 1):.3f})",
        "verdicts": " ".join(verdict.values()),
        "targets": details,
    }


def table(out: Path) -> str:
    rows = [r for d in sorted(p for p in out.iterdir() if p.is_dir()) if (r := row(d))]
    if not rows:
        return "(no finished runs)"
    cols = [c for c in rows[0] if c != "targets"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    names = list(rows[0]["targets"])
    lines += ["", "| run | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    lines += ["| " + r["run"] + " | " + " | ".join(r["targets"].get(n, "-") for n in names) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--table", action="store_true")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("runs", nargs="*")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        threads = args.threads or max(1, (os.cpu_count() or 2) // args.parallel)
        runs = [parse_run(s) for s in args.runs]
        with ThreadPoolExecutor(args.parallel) as pool:
            for (name, _), wall in zip(
                runs, pool.map(lambda r: run_one(args.out, r[0], r[1], extra, threads), runs), strict=True
            ):
                print(f"{name}: {wall:.0f} s", flush=True)
    print(table(args.out))


if __name__ == "__main__":
    main()

"""Issue 14: find the quickstart's recipe by measuring its held-out loss, without generating replies.

    python3 bench/quickstart_recipe.py NAME [key=value ...]   # train configs/quickstart-cpu.yaml + overrides, one row
    python3 bench/quickstart_recipe.py --table                # every row measured so far

A trial trains ``configs/quickstart-cpu.yaml`` with the given config overrides (the quickstart's own split, seed and
system prompt), then measures what the quickstart's first target reads: the assistant-token loss of base and tuned
model on the first 32 held-out records (``chatlora.eval.command.assistant_loss``, as ``chatlora eval`` computes it). Held-out
loss is deterministic given the recipe; the seconds per optimizer step are not (this machine is shared), so compare
a trial's s/step only with a baseline row timed under the same load. Timing skips mid-run evals and checkpoints
(``eval_steps=0``, no ``save_steps`` inside the run) and the first logged interval (warm-up). Rows are appended to
``OUT/trials.jsonl`` and printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "quickstart-cpu.yaml"
EVAL_SAMPLES = 32  # what `chatlora quickstart` evaluates
COLUMNS = ["trial", "overrides", "steps", "tok/step", "base loss", "tuned loss", "ratio", "s/step", "train s"]


def seconds_per_step(metrics_path: Path) -> float | None:
    """Mean seconds per step between the first and the last logged training step (the warm-up interval excluded)."""
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    logged = [r for r in rows if "loss" in r]
    if len(logged) < 2:
        return None
    first, last = logged[0], logged[-1]
    return (last["time"] - first["time"]) / (last["step"] - first["step"])


def run_trial(name: str, overrides: dict[str, str], out: Path) -> dict:
    from chatlora.config import load_config
    from chatlora.eval import assistant_loss, held_out_records
    from chatlora.runcard import added_system_prompt
    from chatlora.training.train import train

    cfg = load_config(
        CONFIG, {**overrides, "output_dir": str(out / name), "eval_steps": 0, "save_steps": 100_000, "overwrite": True}
    )
    started = time.time()
    result = train(cfg)
    train_s = time.time() - started
    records, _ = held_out_records(result.run_card, EVAL_SAMPLES)
    conversations = [r.messages for r in records]
    system_prompt = added_system_prompt(result.run_card)  # for the records that carry none, as in training
    loss = {
        side: assistant_loss(
            result.model,
            result.tokenizer,
            conversations,
            system_prompt,
            cfg.max_length,
            batch_size=16,  # the quickstart's eval batch
            use_adapter=side == "tuned",
        ).loss
        for side in ("base", "tuned")
    }
    steps = result.run_card["results"]["global_step"]
    return {
        "trial": name,
        "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()) or "(config as is)",
        "steps": steps,
        "tok/step": round(result.run_card["results"]["tokens_seen"] / max(steps, 1)),
        "base loss": round(loss["base"], 4),
        "tuned loss": round(loss["tuned"], 4),
        "ratio": round(loss["tuned"] / loss["base"], 4),
        "s/step": round(seconds_per_step(result.metrics_path) or float("nan"), 2),
        "train s": round(train_s),
    }


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="trial name (its run goes to OUT/NAME, replaced if there)")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. lr=2e-3 max_steps=100)")
    p.add_argument("--out", default="runs/recipe", help="where trial runs and trials.jsonl go")
    p.add_argument("--table", action="store_true", help="print every row in OUT/trials.jsonl and exit")
    args = p.parse_args()
    out = Path(args.out)
    log = out / "trials.jsonl"
    if not args.table:
        if not args.name:
            p.error("give a trial NAME (or --table)")
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            p.error(f"overrides are key=value, got {bad[0]!r}")
        out.mkdir(parents=True, exist_ok=True)
        row = run_trial(args.name, dict(o.split("=", 1) for o in args.overrides), out)
        with log.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    print(table(rows if args.table else rows[-1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

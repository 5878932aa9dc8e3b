"""`chatlora eval` on a briefly trained adapter of the embedded SmolLM2-135M-Instruct (CPU, well under a minute)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_jsonl

from chatlora.cli import main
from chatlora.config import DEFAULT_SYSTEM_PROMPT, TrainConfig
from chatlora.training.train import train

pytestmark = pytest.mark.integration


def test_eval_real_model_report(embedded_model_dir, tmp_path):
    """Guards against eval breaking on a real tokenizer/template (SmolLM2's own ChatML, multi-token Chinese):
    non-finite losses, no stop token recognised, or a report missing its numbers."""
    rows = [
        {"instruction": f"问题{i}", "input": "", "output": "臣妾做不到啊。" if i % 2 else "皇上万福金安。"}
        for i in range(16)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = TrainConfig(
        model=embedded_model_dir,
        data=str(data),
        max_steps=2,  # step 1 has lr 0 (warmup), so one step would leave the adapter at zero
        val_size=4,
        batch_size=4,
        output_dir=str(tmp_path / "out"),
        logging_steps=1,
        eval_steps=0,
        save_steps=100,
        max_length=64,
        lr=1e-3,
        system_prompt=DEFAULT_SYSTEM_PROMPT,  # the Huanhuan prompt, from which the persona markers follow
    )
    out = train(cfg).output_dir
    # the persona section on the real model too, sized for a test (its defaults ask 24 probes and run 4 x 20 turns)
    persona = tmp_path / "persona.yaml"
    persona.write_text(
        "persona:\n  probes: 2\n  drift_conversations: 1\n  drift_turns: 2\n  max_new_tokens: 8\n", encoding="utf-8"
    )
    args = ["--max-samples", "4", "--max-new-tokens", "8", "--batch-size", "4", "--persona-config", str(persona)]
    assert main(["eval", "--adapter", str(out), *args]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    base, tuned = metrics["loss"]["base"]["loss"], metrics["loss"]["tuned"]["loss"]
    assert math.isfinite(base) and math.isfinite(tuned) and 0 < tuned < 15 and 0 < base < 15
    assert base != tuned
    assert metrics["source"]["records"] == 4
    stops = [metrics["replies"][k]["stop_rate"] for k in ("base", "tuned")]
    assert all(0 <= s <= 1 for s in stops)
    md = (out / "eval" / "report.md").read_text()
    verdicts = sum(md.count(f"**{v}**") for v in ("PASS", "FAIL", "INFO"))
    assert "## Targets" in md and verdicts == 3 + 2  # + identity leaks, markers
    assert "## Persona" in md and (out / "eval" / "persona_drift.png").is_file()

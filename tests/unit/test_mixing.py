"""Dataset mixing: several sources weighted in one SFT run (repeated --data, --data-weights, YAML `datasets:`)."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from chatlora.cli import main
from chatlora.config import ConfigError, TrainConfig, load_config
from chatlora.mixing import weighted
from chatlora.training.train import prepare_run, train


def _sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "output": "臣妾"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"x{i}", "output": "ok"} for i in range(10)])
    return a, b


def test_weighted_counts_follow_the_weight():
    items = list(range(10))
    assert weighted(items, 3, 0) == items * 3
    half = weighted(items, 0.5, 0)
    assert len(half) == 5 and len(set(half)) == 5 and half == weighted(items, 0.5, 0)
    assert len(weighted(items, 2.5, 1)) == 25 and weighted(items, 0, 0) == []


def test_mix_counts_follow_weights_in_plan_and_run_card(tiny_model_dir, tmp_path):
    """Guards against a weight being ignored or applied to the held-out split: the first source's held-out records
    stay the run's (what eval measures), its training records and the other source's are repeated by weight."""
    a, b = _sources(tmp_path)
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        datasets=[{"path": str(a), "weight": 2}, {"path": str(b), "weight": 0.5}],
        val_size=4,
        output_dir=str(tmp_path / "o"),
        max_steps=1,
        dtype="fp32",
        eval_steps=-1,
    )
    run = prepare_run(cfg)
    assert len(run.split.val) == 4 and len(run.train_ex) == 26 * 2 + 5
    assert f"{a} x2: 26 training records -> 52; {b} x0.5: 10 training records -> 5" in run.mix.line()
    card = train(cfg).run_card
    mix = card["dataset"]["mix"]
    assert [(m["weight"], m["records"], m["examples_per_epoch"]) for m in mix] == [(2.0, 30, 52), (0.5, 10, 5)]
    assert card["dataset"]["path"] == str(a.resolve()) and len(card["dataset"]["val_indices"]) == 4


def test_repeated_data_flags_yaml_and_shipped_retention(tmp_path, capsys):
    a, b = _sources(tmp_path)
    yaml_file = tmp_path / "mix.yaml"
    yaml_file.write_text(f"datasets:\n  - path: {a}\n    weight: 3\n  - path: retention\n", encoding="utf-8")
    cfg = load_config(yaml_file)
    assert cfg.data == str(a) and [d["weight"] for d in cfg.datasets] == [3.0, 1.0]
    cfg = load_config(None, {"datasets": [{"path": str(a)}, {"path": str(b)}], "data_weights": "3,1"})
    assert [d["weight"] for d in cfg.datasets] == [3.0, 1.0]
    with pytest.raises(ConfigError, match="gives 1 weights for 2"):
        load_config(None, {"datasets": [{"path": str(a)}, {"path": str(b)}], "data_weights": "3"})
    with pytest.raises(ConfigError, match="give --data more than once"):
        load_config(None, {"data": str(a), "data_weights": "3"})
    with pytest.raises(ConfigError, match=r"datasets\[1\].weight"):
        load_config(None, {"datasets": [{"path": str(a)}, {"path": str(b), "weight": -1}]})
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"datasets:\n  - path: {a}\n    weigth: 3\n", encoding="utf-8")
    assert main(["train", "--config", str(bad), "--dry-run"]) == 2
    assert "unknown key(s) weigth" in capsys.readouterr().err


def test_bad_record_in_a_mixed_in_source_names_its_file(tiny_model_dir, tmp_path, capsys):
    a, _ = _sources(tmp_path)
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "x"}])
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(a), "--data", str(b), "--dry-run"]
    assert main([*argv, "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"{b}:1: missing field")

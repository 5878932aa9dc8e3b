"""Preference tuning (DPO, ORPO, SimPO, KTO) on TRL's trainers with a tiny random Llama: pinned losses, the run
card, the dry run, resume and the start adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_train import tiny_cfg

pytest.importorskip("trl")

from chatlora.cli import main  # noqa: E402
from chatlora.config import TrainConfig  # noqa: E402
from chatlora.training.align import prepare_preference, train_preference  # noqa: E402


def pairs_file(path: Path, n: int = 12) -> Path:
    return write_jsonl(
        path,
        [{"prompt": f"问题{i}", "chosen": "臣妾做不到啊。", "rejected": "I am an AI assistant."} for i in range(n)],
    )


def pref_cfg(model_dir, data, out, method, **kw) -> TrainConfig:
    """test_train's tiny run, 2 steps without warm-up (the second loss shows the first step)."""
    base = dict(method=method, max_steps=2, val_size=2, eval_steps=0, save_steps=1, warmup_ratio=0.0)
    return tiny_cfg(model_dir, data, out, **{**base, **kw})


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# The first two losses of each method on tests/conftest.py's seed-0 tiny model, the pairs above and pref_cfg
# (CPU fp32, torch 2.13, transformers 5.25, TRL 1.16). DPO's and KTO's first loss is the value at a policy equal to
# its reference (ln 2, and 0.5); the second shows the step taken. A beta, loss type, reference or masking change
# (a side without its end-of-turn token, the prompt trained) moves them by far more than the tolerance.
PINNED = {
    "dpo": [0.693147, 0.572326],
    "orpo": [5.645429, 5.578779],
    "simpo": [1.288993, 1.124897],
    "kto": [0.5, 0.464237],
}


@pytest.mark.parametrize("method", sorted(PINNED))
def test_each_method_trains_two_steps_with_pinned_losses(tiny_model_dir, tmp_path, method):
    """Guards against a method silently training another loss (a wrong TRL config), the reference being the
    trained policy, or the sides' tokens shifting; and checks each run leaves an adapter and a run card."""
    out = tmp_path / method
    result = train_preference(pref_cfg(tiny_model_dir, pairs_file(tmp_path / "p.jsonl"), out, method))
    losses = [r["loss"] for r in _rows(out) if "loss" in r]
    assert losses == pytest.approx(PINNED[method], abs=1e-4)
    card = result.run_card
    assert card["preference"]["method"] == method and card["preference"]["train_pairs"] == 10
    assert card["config"]["method"] == method and card["results"]["global_step"] == 2
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()


def test_dpo_sft_weight_adds_the_chosen_replies_sft_loss(tiny_model_dir, tmp_path, capsys):
    """Guards against --sft-weight being dropped (plain DPO: 60 steps of it on the quickstart's pairs left replies
    that never ended their turn) or weighted wrongly: at the first step the policy equals its reference, so the loss
    is ln 2 plus the weight times the chosen replies' SFT loss, the same batch in both runs."""
    pairs = pairs_file(tmp_path / "p.jsonl")
    first = {}
    for w in (1.0, 2.5):
        out = tmp_path / f"w{w}"
        result = train_preference(pref_cfg(tiny_model_dir, pairs, out, "dpo", max_steps=1, sft_weight=w))
        first[w] = [r["loss"] for r in _rows(out) if "loss" in r][0]
        assert result.run_card["preference"]["sft_weight"] == w
    sft = first[1.0] - math.log(2)
    assert sft > 1.0  # a random tiny model's per-token loss, far from 0
    assert first[2.5] - math.log(2) == pytest.approx(2.5 * sft, rel=1e-4)
    assert main(["train", "--sft-weight", "1", "--data", str(pairs), "--dry-run"]) == 2  # SFT runs have none
    assert "is DPO's" in capsys.readouterr().err


def unpaired_file(path: Path, n: int = 12) -> Path:
    """KTO's unpaired shape: the pairs above as separate completions, desirable and undesirable alternating, every
    third one conversational."""
    rows = []
    for i in range(n):
        good = i % 2 == 0
        completion = "臣妾做不到啊。" if good else "I am an AI assistant."
        if i % 3 == 0:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": f"问题{i}"}],
                    "completion": [{"role": "assistant", "content": completion}],
                    "label": good,
                }
            )
        else:
            rows.append({"prompt": f"问题{i}", "completion": completion, "label": good})
    return write_jsonl(path, rows)


# KTO on unpaired_file with pref_cfg, as PINNED: the first loss is the value at a policy equal to its reference
UNPAIRED_KTO = [0.5, 0.475701]


def test_kto_trains_two_steps_on_unpaired_completions_with_pinned_losses(tiny_model_dir, tmp_path, capsys):
    """Guards against unpaired completions being dropped, read with their labels swapped (the second loss moves
    the other way) or trained as pairs; the plan says what the file holds."""
    out = tmp_path / "kto"
    data = unpaired_file(tmp_path / "u.jsonl")
    result = train_preference(pref_cfg(tiny_model_dir, data, out, "kto"))
    losses = [r["loss"] for r in _rows(out) if "loss" in r]
    assert losses == pytest.approx(UNPAIRED_KTO, abs=1e-4)
    assert result.run_card["preference"]["train_pairs"] == 10 and result.run_card["results"]["global_step"] == 2
    assert (
        main(
            [
                "train",
                "--method",
                "kto",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--val-size",
                "2",
                "--dry-run",
            ]
        )
        == 0
    )
    assert f"data: {data}: 12 unpaired completions -> 10 train, 2 held out" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_loads_no_weights(tiny_model_dir, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("weights loaded in a dry run")

    monkeypatch.setattr("chatlora.training.train.load_model", boom)
    data = pairs_file(tmp_path / "p.jsonl")
    argv = ["train", "--method", "dpo", "--model", str(tiny_model_dir), "--data", str(data)]
    assert main([*argv, "--output-dir", str(tmp_path / "o"), "--val-size", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"data: {data}: 12 preference pairs -> 10 train, 2 held out" in out
    assert "method: dpo (beta 0.1) on TRL; reference: the base" in out
    assert "plan: estimated peak memory" in out and not (tmp_path / "o").exists()
    assert "plan: no time estimate" in out and "estimated training time" not in out  # SFT's FLOPs, not DPO's


def test_bad_pairs_and_a_missing_trl_exit_2_before_any_weights(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Guards against loading a model to then crash on a bad pair, and against a traceback without TRL."""
    monkeypatch.setattr("chatlora.training.train.load_model", lambda *a, **k: pytest.fail("weights loaded"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q"}])
    argv = ["train", "--method", "orpo", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o")]
    assert main([*argv, "--data", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f'{bad}:2: missing field "chosen"')
    pairs = str(pairs_file(tmp_path / "p.jsonl"))
    assert main([*argv, "--data", pairs, "--from-adapter", str(tmp_path)]) == 2
    assert "`--from-adapter` (" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    assert main([*argv, "--data", pairs]) == 2
    assert capsys.readouterr().err == (
        "chatlora: error: `--method orpo` trains on TRL's trainers, which are not installed: pip install 'chatlora[pref]'\n"
    )


def test_from_adapter_starts_from_the_sft_adapter_and_measures_against_it(tiny_model_dir, tmp_path):
    """Guards against --from-adapter being ignored (a fresh LoRA would start at the base: the first loss of DPO is
    ln 2 either way, but the start adapter's own weights must be in the result) and against the reference being the
    base instead of the start adapter, and a mismatched base being accepted."""
    from safetensors.torch import load_file

    from chatlora.training.train import train

    sft_data = write_jsonl(
        tmp_path / "sft.jsonl", [{"instruction": f"问题{i}", "output": "臣妾做不到啊。"} for i in range(8)]
    )
    sft = train(pref_cfg(tiny_model_dir, sft_data, tmp_path / "sft", "sft", max_steps=3, val_size=0)).output_dir
    out = tmp_path / "dpo"
    result = train_preference(
        pref_cfg(tiny_model_dir, pairs_file(tmp_path / "p.jsonl"), out, "dpo", from_adapter=str(sft))
    )
    assert "the starting adapter" in result.run_card["preference"]["reference"]
    rows = [r for r in _rows(out) if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference at the start
    start, end = load_file(sft / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert start.keys() == end.keys()
    moved = [k for k in start if not (start[k] == end[k]).all()]
    assert moved and all("lora_" in k for k in moved)
    with pytest.raises(Exception, match="was trained on"):
        prepare_preference(pref_cfg("embedded", tmp_path / "p.jsonl", tmp_path / "x", "dpo", from_adapter=str(sft)))


def test_refuses_to_overwrite_and_resumes_a_run(tiny_model_dir, tmp_path, capsys):
    """Guards against a second run clobbering the first, and a resume restarting instead of continuing."""
    data = pairs_file(tmp_path / "p.jsonl")
    out = tmp_path / "o"
    cfg = pref_cfg(tiny_model_dir, data, out, "simpo")
    train_preference(cfg)
    before = (out / "adapter_model.safetensors").read_bytes()
    argv = [
        "train",
        "--method",
        "simpo",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == before
    from dataclasses import replace

    resumed = train_preference(replace(cfg, max_steps=3, resume="latest"))
    steps = [r["step"] for r in _rows(out) if "loss" in r]
    assert steps == [1, 2, 3] and resumed.run_card["results"]["global_step"] == 3


def test_report_to_tensorboard_writes_event_files_and_unknown_trackers_exit_2(tiny_model_dir, tmp_path, capsys):
    """Guards against --report-to being dropped (the Trainer's default is none here) and a tracker that is not
    installed failing after the model loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = pairs_file(tmp_path / "p.jsonl")
    out = tmp_path / "tb"
    train_preference(pref_cfg(tiny_model_dir, data, out, "dpo", report_to="tensorboard"))
    tags = set()
    for events in out.glob("runs/*/events.out.tfevents.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"train/loss", "train/rewards/margins"} <= tags
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "x")]
    assert main([*argv, "--method", "dpo", "--report-to", "nosuchtracker", "--dry-run"]) == 2
    assert "unknown tracker" in capsys.readouterr().err

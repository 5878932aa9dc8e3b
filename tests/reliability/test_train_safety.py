"""`chatlora train` never clobbers a run, resumes only from complete checkpoints, refuses bad configs with FILE: key,
and stops on a non-finite loss without writing NaN into JSON (issue 11, items 3, 4, 12, 13, 14, 17)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl

from chatlora.cli import main
from chatlora.config import ConfigError, TrainConfig, load_config


def _data(tmp_path: Path, n: int = 12) -> Path:
    rows = [
        {"instruction": f"问题{i}", "input": "", "output": "臣妾做不到啊。" if i % 2 else "皇上万福金安。"}
        for i in range(n)
    ]
    return write_jsonl(tmp_path / "d.jsonl", rows)


def _args(model, data, out, *extra) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--logging-steps",
        "1",
        "--save-steps",
        "2",
        "--system-prompt",
        "S",
        "--lr",
        "5e-3",
        *extra,
    ]


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    assert main(_args(tiny_model_dir, _data(tmp), out, "--max-steps", "4")) == 0
    return out


# --------------------------------------------------------------------------------------------- item 3, 13
def test_train_refuses_an_existing_run_without_resume_or_overwrite(tiny_model_dir, finished_run, tmp_path, capsys):
    """Guards against `train --output-dir` on an existing run (a forgotten --resume) deleting its checkpoints and
    replacing its adapter, metrics and card."""
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()}
    assert main(_args(tiny_model_dir, _data(tmp_path), finished_run, "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()} == before


def test_train_refuses_a_folder_of_other_files_and_overwrite_keeps_them(tiny_model_dir, tmp_path, capsys):
    """Guards against a run overwriting unrelated files in a non-empty --output-dir."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(_args(tiny_model_dir, _data(tmp_path), out, "--max-steps", "2")) == 2
    assert "folder is not empty" in capsys.readouterr().err and not (out / "chatlora.json").exists()
    assert main(_args(tiny_model_dir, _data(tmp_path), out, "--max-steps", "2", "--overwrite")) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "chatlora.json").is_file()


def test_overwrite_replaces_the_previous_runs_checkpoints(tiny_model_dir, tmp_path):
    """Guards against a replaced run leaving the old run's later checkpoints behind (a later --resume would pick
    one of them)."""
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, _data(tmp_path), out, "--max-steps", "4")) == 0
    assert main(_args(tiny_model_dir, _data(tmp_path), out, "--max-steps", "2", "--overwrite")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "chatlora.json").read_text())["results"]["global_step"] == 2
    with pytest.raises(ConfigError, match="--overwrite.*--resume"):
        TrainConfig(resume="latest", overwrite=True)


def test_output_dir_that_is_a_file_or_read_only_is_refused_before_loading(tiny_model_dir, tmp_path, capsys):
    """Guards against tracebacks after minutes of loading when the output cannot be written."""
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert main(_args(tiny_model_dir, _data(tmp_path), a_file)) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    read_only = Path("/sys/kernel/chatlora-run") if os.geteuid() == 0 else tmp_path / "ro" / "run"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
    assert main(_args(tiny_model_dir, _data(tmp_path), read_only)) == 2
    assert "cannot be created or written" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- item 4
CRASH_DURING_SAVE = """
import os, sys
import transformers.trainer as T
import chatlora.training.train

original_rng, original_mark = T.Trainer._save_rng_state, chatlora.training.train.mark_complete


def crash_in_rng(self, output_dir):  # the optimizer is on disk, the RNG state and trainer state are not
    if self.state.global_step == int(os.environ["CRASH_AT"]) and os.environ["CRASH_IN"] == "rng":
        os._exit(9)
    return original_rng(self, output_dir)


def crash_in_mark(ckpt, step):  # every file is on disk, the completion mark is not
    if step == int(os.environ["CRASH_AT"]) and os.environ["CRASH_IN"] == "mark":
        os._exit(9)
    return original_mark(ckpt, step)


T.Trainer._save_rng_state = crash_in_rng
chatlora.training.train.mark_complete = crash_in_mark
from chatlora.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("crash_in", ["rng", "mark"])
def test_a_crash_while_saving_a_checkpoint_is_skipped_on_resume(tiny_model_dir, tmp_path, crash_in):
    """Guards against --resume crashing with a traceback on a checkpoint that a kill cut short: it resumes from the
    last complete one, says which it skipped, and the curve continues without gaps or duplicates."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH_DURING_SAVE)
    out = tmp_path / "run"
    cmd = [sys.executable, str(script), *_args(tiny_model_dir, _data(tmp_path), out, "--max-steps", "6")]
    env = {**os.environ, "CRASH_AT": "4", "CRASH_IN": crash_in}
    crashed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == 9, crashed.stderr[-2000:]
    assert (out / "checkpoint-2" / "chatlora-complete.json").is_file()
    assert not (out / "checkpoint-4" / "chatlora-complete.json").exists()
    resumed = subprocess.run(
        [*cmd, "--resume"], env={**env, "CRASH_AT": "-1"}, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "skipping" in resumed.stderr and "checkpoint-4: incomplete" in resumed.stderr
    rows = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r.get("event") == "begin"] == [0, 2]
    assert (out / "checkpoint-4" / "chatlora-complete.json").is_file(), "the step is saved again, completely"


def test_resume_names_an_unreadable_file_of_a_complete_checkpoint(tiny_model_dir, tmp_path, capsys):
    """Guards against a traceback from torch.load when a checkpoint file was damaged after it was written."""
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, _data(tmp_path), out, "--max-steps", "4")) == 0
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert main(_args(tiny_model_dir, _data(tmp_path), out, "--max-steps", "6", "--resume")) == 2
    assert f"{optimizer}: truncated or unreadable" in capsys.readouterr().err


def test_a_torn_last_metrics_line_is_skipped_by_eval_and_resume(tiny_model_dir, tmp_path, caplog):
    """Bug: a run killed (or out of disk) during a metrics.jsonl append left a torn last line; `train --resume` then
    failed with a JSONDecodeError, and `eval` crashed on it after computing everything."""
    out, data = tmp_path / "run", _data(tmp_path)
    assert main(_args(tiny_model_dir, data, out, "--max-steps", "4")) == 0
    metrics = out / "metrics.jsonl"
    whole = metrics.read_text(encoding="utf-8")
    metrics.write_text(whole + '{"step": 5, "loss": 1.2', encoding="utf-8")
    eval_args = ["eval", "--adapter", str(out), "--data", str(data), "--no-persona", "--max-samples", "2"]
    assert main([*eval_args, "--max-new-tokens", "2"]) == 0
    assert (out / "eval" / "loss.png").is_file() and "torn last line" in caplog.text
    assert main(_args(tiny_model_dir, data, out, "--max-steps", "6", "--resume")) == 0
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]  # all whole again
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_damaged_metrics_line_before_the_last_names_the_file_and_line(tmp_path):
    """Bug: skipping any unreadable line would hide real damage; only the last line can be a torn append."""
    from chatlora.errors import FileError
    from chatlora.runcard import read_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n', encoding="utf-8")
    with pytest.raises(FileError, match=r"metrics.jsonl:2: not a metrics row"):
        read_metrics(metrics)
    metrics.write_bytes('{"step": 1, "loss": 2.0}\n\n{"step": 2, "note": "臣'.encode()[:-1])  # a torn character
    assert read_metrics(metrics) == [{"step": 1, "loss": 2.0}]


def test_only_complete_checkpoints_count_for_rotation(tiny_model_dir, tmp_path):
    """Guards against save_total_limit deleting the last complete checkpoint in favour of an incomplete one."""
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, _data(tmp_path), out, "--max-steps", "6", "--save-total-limit", "2")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert all((p / "chatlora-complete.json").is_file() for p in out.glob("checkpoint-*"))


# --------------------------------------------------------------------------------------------- item 12
@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("data: 5\n", "`data`: expected a string, got 5"),
        ("output_dir: 5\n", "`output_dir`: expected a string"),
        ("lora_targets: [1, 2]\n", "`lora_targets`: expected a list of strings"),
        ("system_prompt: [a, b]\n", "`system_prompt`: expected a string"),
        ("epochs: .inf\n", "`epochs`: expected a finite number"),
        ("max_steps: true\n", "`max_steps`: expected an integer"),
        ("lr: [1]\n", "`lr`: expected a number"),
        ("packing: maybe\n", "`packing`: expected true or false"),
        ("columns: {instruction: 5}\n", "`columns`: expected a mapping"),
        ("max_steps: " + "9" * 5000 + "\n", "unreadable value in YAML"),
        ("[1, 2]\n", "expected a mapping of config keys"),
    ],
)
def test_yaml_with_wrong_types_is_one_line_naming_file_and_key(tmp_path, capsys, yaml_text, message):
    """Guards against tracebacks for configs whose values have the wrong type (issue 11 item 12)."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text, encoding="utf-8")
    assert main(["train", "--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if "`" in message:
        assert f"{config}: " in err


def test_yaml_values_of_the_obvious_types_are_accepted(tmp_path):
    """Guards against the type checks refusing what YAML users write naturally."""
    config = tmp_path / "c.yaml"
    config.write_text("columns: {instruction: prompt}\nresume: false\nlr: 1e-4\nlora_targets: q_proj,v_proj\n")
    cfg = load_config(config)
    assert cfg.columns == "instruction=prompt" and cfg.resume is None and cfg.lr == 1e-4
    assert cfg.lora_targets == ["q_proj", "v_proj"]


# --------------------------------------------------------------------------------------------- item 14
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "inf"], "`--lr`: expected a finite number"),
        (["--lr", "nan"], "`--lr`: expected a finite number"),
        (["--lora-alpha", "0"], "`--lora-alpha` (lora_alpha: 0) must be > 0"),
        (["--warmup-ratio", "5"], "`--warmup-ratio` (warmup_ratio: 5.0) must be in [0, 1)"),
        (["--max-steps", "0"], "`--max-steps` (max_steps: 0) must be > 0, or -1"),
        (["--save-steps", "0"], "`--save-steps` (save_steps: 0) must be > 0"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path, capsys, flags, message):
    """Guards against --lr inf training non-finite weights with exit 0, --lora-alpha 0 training an adapter that
    does nothing, and --warmup-ratio 5 being used as 5 steps."""
    assert main(["train", "--data", str(_data(tmp_path)), "--dry-run", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_diverging_run_stops_and_never_writes_nan_into_json(tiny_model_dir, tmp_path, capsys):
    """Guards against a run that diverges exiting 0 with non-finite weights and the literal NaN in metrics.jsonl
    and the run card (invalid JSON)."""
    out = tmp_path / "run"
    args = _args(tiny_model_dir, _data(tmp_path), out, "--max-steps", "8", "--max-grad-norm", "0")
    args[args.index("--lr") + 1] = "1e30"  # finite, and enough to overflow the weights
    assert main([*args, "--warmup-ratio", "0"]) == 2
    assert "loss became nan" in capsys.readouterr().err.lower()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)
    assert not (out / "chatlora.json").exists()

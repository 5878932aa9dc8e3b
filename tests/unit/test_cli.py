"""The CLI end to end on a tiny random model: exit codes, error lines, files written."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
from conftest import write_jsonl

from chatlora.cli import main


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One `chatlora train` run for the module: its output dir and what it printed to stdout."""
    tmp = tmp_path_factory.mktemp("cli")
    data = write_jsonl(tmp / "d.jsonl", [{"instruction": f"问{i}", "input": "", "output": "嗯。"} for i in range(10)])
    out = tmp / "run"
    printed = io.StringIO()  # capsys is per test; this module-wide run keeps its own stdout
    with contextlib.redirect_stdout(printed):
        code = main(
            [
                "train",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(data),
                "--output-dir",
                str(out),
                "--max-steps",
                "3",
                "--batch-size",
                "4",
                "--val-size",
                "2",
                "--logging-steps",
                "1",
                "--eval-steps",
                "0",
                "--save-steps",
                "100",
                "--lora-r",
                "4",
                "--lr",
                "1e-3",
            ]
        )
    assert code == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def run_dir(trained):
    return trained[0]


def test_train_writes_adapter_and_prints_where(trained):
    """Guards against a train command that exits 0 without an adapter or run card, or without printing where
    the adapter, run card and metrics are and the final loss."""
    run_dir, printed = trained
    card = json.loads((run_dir / "chatlora.json").read_text())
    assert card["config"]["lora_r"] == 4 and card["results"]["global_step"] == 3
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "adapter_config.json").is_file()
    lines = printed.splitlines()
    assert lines[0] == f"adapter:     {run_dir}  (PEFT format; run card {run_dir / 'chatlora.json'})"
    assert lines[1] == f"metrics:     {run_dir / 'metrics.jsonl'}"
    loss = card["results"]["train_loss_final"]
    assert f"steps 3, final train loss {loss:.4f}" in printed


def test_data_check_valid(tmp_path, tiny_model_dir, capsys):
    """Guards against `data check` failing on good data or printing no statistics."""
    path = write_jsonl(
        tmp_path / "ok.jsonl",
        [
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        ],
    )
    assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--max-length", "20", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 2 and stats["duplicates"] == 1
    assert stats["tokens"]["max"] > 20 and stats["tokens"]["truncated"] == 2


def test_data_check_adds_no_system_prompt_to_a_users_data(tmp_path, tiny_model_dir, capsys):
    """Guards against `data check` measuring a user's records with chatlora's built-in 甄嬛 prompt added (issue 22.6):
    it renders them as train does, with no system prompt unless --system-prompt gives one."""
    from chatlora.model import load_tokenizer
    from chatlora.template import encode_conversation

    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path = write_jsonl(tmp_path / "ok.jsonl", [{"messages": messages}])
    tok = load_tokenizer(str(tiny_model_dir))
    bare = len(encode_conversation(messages, tok).input_ids)
    with_s = len(encode_conversation([{"role": "system", "content": "S"}, *messages], tok).input_ids)
    for extra, want in (([], bare), (["--system-prompt", "S"], with_s)):
        assert main(["data", "check", str(path), "--model", str(tiny_model_dir), "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["tokens"]["max"] == want


def test_data_check_invalid_exits_2_with_file_line_errors(tmp_path, capsys):
    """Guards against tracebacks or errors without file:line for bad data."""
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": 3}\n{oops\n', encoding="utf-8"
    )
    assert main(["data", "check", str(path), "--no-tokenize"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"{path}:2:") and "output" in lines[0]
    assert lines[1].startswith(f"{path}:3:")
    assert "Traceback" not in err


def test_train_with_invalid_data_gives_the_same_errors(tmp_path, tiny_model_dir, capsys):
    """Guards against train and data check disagreeing on what is wrong."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a"}\n', encoding="utf-8")
    assert main(["data", "check", str(path), "--no-tokenize"]) == 2
    check_err = capsys.readouterr().err
    assert (
        main(["train", "--data", str(path), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o")]) == 2
    )
    assert capsys.readouterr().err == check_err


def test_train_bad_lora_target_is_a_clear_error(tiny_model_dir, tiny_dataset, tmp_path, capsys):
    """Guards against a LoRA target typo silently training nothing."""
    code = main(
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(tiny_dataset),
            "--output-dir",
            str(tmp_path / "o"),
            "--lora-targets",
            "q_attn,v_proj",
            "--max-steps",
            "1",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "q_attn" in err and "q_proj" in err and "Traceback" not in err


def test_chat_prompt_prints_one_reply(run_dir, capsys):
    """Guards against `chat --prompt` hanging on stdin, printing nothing, or printing other than the model's reply
    (the library's greedy reply to the same prompt, then one newline)."""
    from chatlora.inference.infer import ChatModel, SamplingConfig

    greedy = SamplingConfig(max_new_tokens=5, temperature=0)
    tuned = ChatModel.load(run_dir).generate([{"role": "user", "content": "你好"}], greedy).text
    base = ChatModel.load(run_dir, base_only=True).generate([{"role": "user", "content": "hi"}], greedy).text
    assert tuned.strip() and base.strip(), "the tiny model's replies should not be empty: pick another prompt"
    flags = ["--max-new-tokens", "5", "--temperature", "0"]
    assert main(["chat", "--adapter", str(run_dir), "--prompt", "你好", *flags]) == 0
    assert capsys.readouterr().out == tuned + "\n"
    assert main(["chat", "--adapter", str(run_dir), "--base-only", "--prompt", "hi", *flags]) == 0
    assert capsys.readouterr().out == base + "\n"


def test_inference_dtype_is_bf16_where_the_cpu_has_bf16_units(run_dir, monkeypatch, capsys):
    """Guards against inference loading fp32 on a CPU that multiplies bf16 in hardware (generation 1.9x slower),
    bf16 where bf16 is emulated (slower than fp32), LoRA weights cast down with the base, `--dtype` being ignored,
    and fp16 accepted on the CPU (a traceback instead of exit 2)."""
    import torch

    from chatlora import model as model_module
    from chatlora.inference.infer import ChatModel
    from chatlora.model import dtype_for

    def dtypes(chat):
        return {("lora_" in n, p.dtype) for n, p in chat.model.named_parameters()}

    cpu = torch.device("cpu")
    monkeypatch.setattr(model_module, "cpu_bf16_speedup", lambda: 1.6)
    assert dtype_for(cpu) == torch.bfloat16 and dtype_for(cpu, "fp32") == torch.float32
    assert dtypes(ChatModel.load(run_dir, device="cpu")) == {(False, torch.bfloat16), (True, torch.float32)}
    assert dtypes(ChatModel.load(run_dir, device="cpu", dtype="fp32")) == {
        (False, torch.float32),
        (True, torch.float32),
    }
    monkeypatch.setattr(model_module, "cpu_bf16_speedup", lambda: None)
    assert dtype_for(cpu) == torch.float32 and dtype_for(cpu, "bf16") == torch.bfloat16
    reply = ["--prompt", "你好", "--max-new-tokens", "3", "--temperature", "0"]
    assert main(["chat", "--adapter", str(run_dir), "--dtype", "bf16", *reply]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["chat", "--adapter", str(run_dir), "--dtype", "fp16", "--device", "cpu", *reply]) == 2
    err = capsys.readouterr().err
    assert "--dtype fp16 needs a CUDA GPU" in err and "Traceback" not in err
    assert main(["chat", "--adapter", str(run_dir), "--dtype", "half", *reply]) == 2
    assert "--dtype must be auto, fp32, bf16, fp16; got 'half'" in capsys.readouterr().err


def test_chat_interactive_multi_turn(run_dir):
    """Guards against the interactive loop crashing on /reset, multi-turn history or end of input."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatlora",
            "chat",
            "--adapter",
            str(run_dir),
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
        ],
        input="你好\n再说一次\n/reset\n第三句\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("you> ") == 5 and proc.stdout.count(f"{run_dir.name}> ") == 3
    assert "history cleared" in proc.stderr


def test_chat_needs_a_model(capsys):
    """Guards against a confusing traceback when neither --adapter nor --model is given."""
    assert main(["chat", "--prompt", "x"]) == 2
    assert "--adapter" in capsys.readouterr().err


def test_generate_keeps_input_and_adds_reply(run_dir, tmp_path):
    """Guards against batch generation losing input fields, reordering lines, or lying about finish reasons."""
    inp = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "一", "id": 1},
            {"messages": [{"role": "user", "content": "二"}], "id": 2, "system": "别的系统提示"},
            {"prompt": "三三三", "id": 3},
        ],
    )
    out = tmp_path / "r.jsonl"
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(run_dir),
                "--input",
                str(inp),
                "--output",
                str(out),
                "--max-new-tokens",
                "4",
                "--temperature",
                "0",
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert rows[1]["system"] == "别的系统提示"
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and isinstance(r["reply"], str)
        if r["finish_reason"] == "length":
            assert r["usage"]["completion_tokens"] == 4
        else:
            assert r["usage"]["completion_tokens"] <= 4


def test_generate_bad_input_is_a_clear_error(run_dir, tmp_path, capsys):
    """Guards against a traceback on a malformed prompts file."""
    inp = tmp_path / "p.jsonl"
    inp.write_text('{"prompt": "a"}\nnot json\n', encoding="utf-8")
    assert main(["generate", "--adapter", str(run_dir), "--input", str(inp), "--output", str(tmp_path / "o")]) == 2
    assert f"{inp}:2:" in capsys.readouterr().err


def test_merge_then_chat_with_merged_model(run_dir, tmp_path, capsys):
    """Guards against a merged dir that cannot be used on its own."""
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run_dir), "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "chatlora.json").is_file()
    assert main(["chat", "--model", str(out), "--prompt", "你好", "--max-new-tokens", "3", "--temperature", "0"]) == 0


def _no_loading(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a tokenizer or model loaded before the flags were checked")

    monkeypatch.setattr("chatlora.training.train.load_model", boom)
    monkeypatch.setattr("chatlora.training.train.load_tokenizer", boom)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # seeds: numpy (set_seed) takes 0..2**32-1 only
        (["--seed", "-1"], "`--seed` (seed: -1) must be in 0..4294967295 (numpy's and torch's seed range)"),
        (["--seed", str(2**32)], "`--seed` (seed: 4294967296) must be in 0..4294967295"),
        (["--data-seed", "-1"], "`--data-seed` (data_seed: -1) must be in 0..4294967295"),
        (["--split-seed", "-7"], "`--split-seed` (split_seed: -7) must be in 0..4294967295"),
        # schedulers: a name the Trainer knows, and one it can build from chatlora's arguments
        (["--lr-scheduler", "bogus"], "`--lr-scheduler` (lr_scheduler: 'bogus') must be one of linear, cosine,"),
        (["--lr-scheduler", "cosine_with_min_lr"], "(lr_scheduler: 'cosine_with_min_lr') must be one of linear,"),
        (["--lr-scheduler", "warmup_stable_decay"], "(lr_scheduler: 'warmup_stable_decay') must be one of linear,"),
        (
            ["--lr-scheduler", "reduce_lr_on_plateau", "--eval-steps", "0"],
            "`--lr-scheduler` (lr_scheduler: 'reduce_lr_on_plateau') steps on the held-out loss: needs "
            "--eval-steps > 0",
        ),
        (["--lr-scheduler", "polynomial", "--lr", "1e-8"], "`--lr` (lr: 1e-08) must be > 1e-07 with polynomial"),
        # optimisation
        (["--warmup-ratio", "-0.1"], "`--warmup-ratio` (warmup_ratio: -0.1) must be in [0, 1)"),
        (["--weight-decay", "-1"], "`--weight-decay` (weight_decay: -1.0) must be a finite number >= 0"),
        (["--max-grad-norm", "-1"], "`--max-grad-norm` (max_grad_norm: -1.0) must be a finite number >= 0"),
        (["--grad-accum", "0"], "`--grad-accum` (grad_accum: 0) must be > 0"),
        (["--lr", "0"], "`--lr` (lr: 0.0) must be a finite number > 0"),
        (["--epochs", "0"], "`--epochs` (epochs: 0.0) must be > 0 unless max_steps is set"),
        (["--max-steps", "0"], "`--max-steps` (max_steps: 0) must be > 0, or -1 for all epochs"),
        # logging, held-out loss and checkpoints
        (["--logging-steps", "0"], "`--logging-steps` (logging_steps: 0) must be > 0"),
        (["--eval-steps", "-2"], "`--eval-steps` (eval_steps: -2) must be > 0 (every N steps), 0 (only at the end)"),
        (["--save-steps", "0"], "`--save-steps` (save_steps: 0) must be > 0"),
        (["--save-total-limit", "0"], "`--save-total-limit` (save_total_limit: 0) must be > 0"),
        (["--deepspeed", "no-such-ds.json"], "`--deepspeed` (deepspeed: 'no-such-ds.json') must name a JSON file"),
    ],
)
def test_train_flags_the_trainer_would_refuse_exit_2_before_anything_loads(
    flags, message, tiny_model_dir, tiny_dataset, tmp_path, monkeypatch, capsys
):
    """Guards against `train --seed -1`, `--lr-scheduler bogus` and the like passing chatlora's checks, loading the
    model, creating the output folder, then dying in numpy, TrainingArguments or the scheduler with a ValueError
    traceback (exit 1) and an empty folder left behind."""
    _no_loading(monkeypatch)
    out = tmp_path / "o"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(tiny_dataset), "--output-dir", str(out)]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("chatlora: error: ") and message in err, err
    assert "Traceback" not in err and not out.exists()
    assert main([*args, *flags, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_plateau_scheduler_without_held_out_records_exits_2_before_anything_loads(
    tiny_model_dir, tiny_dataset, tmp_path, monkeypatch, capsys
):
    """Guards against reduce_lr_on_plateau / greedy on a split with no held-out records: TrainingArguments refuses
    them without an eval strategy, after the model loaded and the output folder was made."""
    _no_loading(monkeypatch)
    out = tmp_path / "o"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(tiny_dataset), "--output-dir", str(out)]
    assert main([*args, "--lr-scheduler", "greedy", "--eval-steps", "5", "--val-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "chatlora: error: `--lr-scheduler` (greedy) steps on the held-out loss, but no record is held out "
        "(val_size 0 of the records): set --val-size or pick another scheduler\n"
    )
    assert not out.exists()


def test_scheduler_names_match_transformers():
    """Guards against chatlora's list of schedulers drifting from the installed transformers: a name it dropped would
    pass the check and fail after the model loaded; a new one would be refused for no reason."""
    from transformers.trainer_utils import SchedulerType

    from chatlora.config import SCHEDULERS, SCHEDULERS_NEEDING_SETTINGS

    assert set(SCHEDULERS) | SCHEDULERS_NEEDING_SETTINGS == {s.value for s in SchedulerType}
    assert not set(SCHEDULERS) & SCHEDULERS_NEEDING_SETTINGS


def test_shortest_run_logs_its_last_step_and_plots_it(tiny_model_dir, tmp_path, capsys):
    """Guards against the first run a user tries (`--max-steps 4`, under the default `--logging-steps 10`) logging no
    train loss, writing no loss.png and ending with "no train loss logged | None tokens/s at the end"."""
    rows = [
        {
            "messages": [
                {"role": "system", "content": f"你是角色{i % 3}。"},
                {"role": "user", "content": f"问题{i}"},
                {"role": "assistant", "content": "臣妾做不到啊。"},
                {"role": "user", "content": "为什么?"},
                {"role": "assistant", "content": "皇上万福金安。" * (1 + i % 2)},
            ]
        }
        for i in range(12)
    ]
    data = write_jsonl(tmp_path / "multi.jsonl", rows)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in metrics if "loss" in r]
    assert [r["step"] for r in losses] == [4] and losses[0]["tokens_per_second_recent"] > 0
    assert (out / "loss.png").is_file() and f"loss plot:   {out / 'loss.png'}" in printed
    card = json.loads((out / "chatlora.json").read_text())
    assert card["results"]["train_loss_final"] == losses[0]["loss"]
    assert f"steps 4, final train loss {losses[0]['loss']:.4f}" in printed
    assert "None" not in printed and "no train loss logged" not in printed


def test_run_summary_never_prints_none(tmp_path, capsys):
    """Guards against the summary line printing "None tokens/s at the end" for a run that logged no train loss (a
    resume from its last checkpoint trains no step)."""
    from chatlora.cli import _print_paths

    card = {
        "results": {"global_step": 4, "train_loss_final": None, "tokens_per_second_recent": None},
        "hardware": {"device": "cpu", "precision": "fp32"},
    }
    card["results"]["tokens_per_second_average"] = 0.0
    _print_paths(tmp_path, card)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == "steps 4, no train loss logged | tokens/s: 0.0 on average (warm-up included) on cpu (fp32)"

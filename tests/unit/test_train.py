"""Training, adapters, reload and merge on a tiny random Llama (fast, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from probes import PrecisionProbe, assert_bf16_autocast

from chatlora.cli import main
from chatlora.config import ConfigError, TrainConfig, load_config
from chatlora.data import DataError
from chatlora.model import (
    ModelError,
    Precision,
    apply_lora,
    linear_module_names,
    load_model,
    load_tokenizer,
    pick_precision,
)
from chatlora.packing import collate
from chatlora.training.train import prepare_run, split_records, train, training_args


def tiny_cfg(model_dir, data, out, **kw) -> TrainConfig:
    base = dict(
        model=str(model_dir),
        data=str(data),
        output_dir=str(out),
        max_steps=6,
        batch_size=4,
        val_size=2,
        logging_steps=1,
        eval_steps=3,
        save_steps=3,
        lr=5e-3,
        lora_dropout=0.0,
        system_prompt="S",
        dtype="fp32",  # the pinned losses are fp32's; "auto" is bf16 on CPUs with bf16 units (tested on its own)
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    data = write_jsonl(
        tmp / "d.jsonl",
        [
            {"instruction": f"q{i}", "input": "", "output": "臣妾做不到啊。" if i % 2 else "皇上万福金安。"}
            for i in range(12)
        ],
    )
    result = train(tiny_cfg(tiny_model_dir, data, tmp / "out"))
    return result


def test_collate_pads_right_and_masks_padding():
    """Guards against padding tokens being attended to or trained on."""
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_split_is_seeded_and_drops_train_copies_of_held_out(tmp_path):
    """Guards against evaluating on conversations that were also trained on (duplicates in the data)."""
    from chatlora.data import load_records

    rows = [{"instruction": f"q{i % 5}", "input": "", "output": f"a{i % 5}"} for i in range(20)]
    records = load_records(write_jsonl(tmp_path / "d.jsonl", rows))
    a, b = split_records(records, 2, seed=1), split_records(records, 2, seed=1)
    assert [r.index for r in a.val] == [r.index for r in b.val]
    held = {json.dumps(r.messages) for r in a.val}
    assert not any(json.dumps(r.messages) in held for r in a.train)
    assert a.dropped_duplicates > 0
    assert len(split_records(records, 0.1, seed=1).val) == 2


def test_lora_params_change_and_base_params_do_not(tiny_model_dir, tiny_dataset, tmp_path):
    """Guards against training nothing (the seed's q_attn typo) or touching frozen base weights."""
    before = load_model(str(tiny_model_dir)).state_dict()
    result = train(tiny_cfg(tiny_model_dir, tiny_dataset, tmp_path / "o", max_steps=3, eval_steps=0))
    model = result.model
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(("lora_B" in n) and p.abs().sum() > 0 for n, p in lora.items()), "lora_B starts at 0 and must move"
    for name, value in model.get_base_model().state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace("base_layer.", "")
        assert torch.equal(value, before[key]), f"base weight {key} changed"
    targets = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in lora if "lora_A" in n}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_unknown_lora_target_lists_the_real_modules(tiny_model_dir):
    """Guards against the seed tutorial's silent 'q_attn' (matches nothing, q_proj untrained)."""
    model = load_model(str(tiny_model_dir))
    with pytest.raises(ModelError) as e:
        apply_lora(model, 8, 32, 0.1, ["q_attn", "k_proj"])
    assert "q_attn" in str(e.value) and "q_proj" in str(e.value)
    assert "lm_head" not in linear_module_names(model)


def test_outputs_run_card_metrics_plot_and_checkpoints(trained):
    """Guards against a run that leaves no record of what it trained on or how it went."""
    out = trained.output_dir
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    card = json.loads((out / "chatlora.json").read_text())
    assert card["dataset"]["records"] == 12 and len(card["dataset"]["val_indices"]) == 2
    assert len(card["dataset"]["sha256"]) == 64 and card["dataset"]["split_seed"] == 42
    assert card["config"]["lora_r"] == 8 and card["results"]["global_step"] == 6
    assert card["results"]["eval_loss"] is not None and "torch" in card["versions"]
    assert card["template"]["end_of_turn"] == "<|im_end|>"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_second_recent"] > 0 for r in rows if "loss" in r)
    res = card["results"]
    assert res["tokens_per_second_average"] > 0 and res["tokens_per_second_recent"] > 0
    assert card["plan"]["packing"] and card["plan"]["logits_at_labels"], "the default path must be the fast one"
    assert any("eval_loss" in r for r in rows)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-3", "checkpoint-6"]
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in (out / "checkpoint-6").iterdir()}


# The first losses of the tiny run (tests/conftest.py's seed-0 model, the `trained` fixture's data and config),
# measured with CPU fp32 on torch 2.13.0 and transformers 5 (identical with 1 and 2 threads). Step 1 trains at lr 0
# (warm-up), so it is the random model's loss, about ln(vocab size). A tolerance of 1e-4 absorbs the summation
# order of other CPUs; an lr, scheduler, label-shift, loss-normalisation or masking change moves them by far more.
PINNED_LOSSES = {
    "packed": [5.564567, 5.561653, 5.494630, 5.438020],
    "padded": [5.556477, 5.563923, 5.521863, 5.447497],
}


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_first_losses_are_pinned(trained, tiny_model_dir, tmp_path):
    """Guards against a change that shifts every training path alike (the equivalence tests compare paths with
    each other, so they cannot see it): the default (packed) and the padded run's first losses are pinned."""
    assert trained.run_card["plan"]["packing"]
    assert _losses(trained.output_dir)[:4] == pytest.approx(PINNED_LOSSES["packed"], abs=1e-4)
    data = trained.run_card["dataset"]["path"]
    padded = train(tiny_cfg(tiny_model_dir, data, tmp_path / "padded", packing=False))
    assert _losses(padded.output_dir)[:4] == pytest.approx(PINNED_LOSSES["padded"], abs=1e-4)


def test_reloaded_adapter_gives_identical_logits(trained):
    """Guards against an adapter that saves or reloads wrong (PEFT format, PeftModel.from_pretrained)."""
    from peft import PeftModel

    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    trained.model.eval()
    with torch.no_grad():
        want = trained.model(input_ids=ids).logits
        base = load_model(trained.run_card["base_model"]["resolved"])
        got = PeftModel.from_pretrained(base, str(trained.output_dir)).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_merged_model_logits_equal_adapter_logits(trained, tmp_path):
    """Guards against a merge that drops or double-applies the LoRA delta."""
    from chatlora.merge import merge

    out = merge(trained.output_dir, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = load_model(str(out)).eval()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, trained.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    assert not any("lora" in k for k in merged.state_dict())


def test_invalid_data_stops_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    """Guards against spending minutes loading a model only to crash on a bad record."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', encoding="utf-8")

    def boom(*a, **k):
        raise AssertionError("model loaded before data was validated")

    monkeypatch.setattr("chatlora.training.train.load_model", boom)
    monkeypatch.setattr("chatlora.training.train.load_tokenizer", boom)
    with pytest.raises(DataError) as e:
        train(tiny_cfg(tiny_model_dir, bad, tmp_path / "o"))
    assert e.value.problems[0].startswith(f"{bad}:2:")


def test_records_without_a_reply_token_in_max_length_are_dropped(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """Guards against training on conversations whose prompt alone fills max_length (all labels -100: the loss is
    0 or NaN and the step is wasted), and against a run that silently trains on nothing."""
    from chatlora.data import load_records
    from chatlora.model import load_tokenizer
    from chatlora.training.train import encode_records

    rows = [{"instruction": "q" * n, "input": "", "output": "嗯。"} for n in (2, 200, 3)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = load_tokenizer(str(tiny_model_dir))
    examples, truncated, empty = encode_records(load_records(data), tok, "S", max_length=64)
    assert [r.line for r in empty] == [2] and truncated == 1 and len(examples) == 2
    assert all(any(label != -100 for label in ex["labels"]) for ex in examples)

    def no_model(*a, **k):
        raise AssertionError("model loaded although no record can be trained")

    monkeypatch.setattr("chatlora.training.train.load_model", no_model)
    with pytest.raises(DataError, match="no training conversation has a reply token within max_length=8"):
        train(tiny_cfg(tiny_model_dir, data, tmp_path / "o", max_length=8, val_size=0))


def test_train_on_prompt_labels_every_token_of_training_records_only(tiny_model_dir, tmp_path):
    """Guards against `train_on_prompt` being ignored (replies-only labels), against it changing which records are
    kept, and against it reaching the held-out examples (their loss must count the replies only, as `eval` does)."""
    from chatlora.training.train import prepare_run

    rows = [{"instruction": f"问题{i}", "input": "", "output": f"臣妾{i}。"} for i in range(8)]
    rows.append({"instruction": "q" * 200, "input": "", "output": "嗯。"})  # no reply token fits max_length=64
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    plain = prepare_run(tiny_cfg(tiny_model_dir, data, tmp_path / "a", max_length=64))
    run = prepare_run(tiny_cfg(tiny_model_dir, data, tmp_path / "b", max_length=64, train_on_prompt=True))
    assert [ex["input_ids"] for ex in run.train_ex] == [ex["input_ids"] for ex in plain.train_ex]
    assert run.dropped == plain.dropped == {"train": 1, "val": 0}
    for ex, replies_only in zip(run.train_ex, plain.train_ex, strict=True):
        assert ex["labels"] == ex["input_ids"]
        assert -100 in replies_only["labels"]
    assert run.val_ex == plain.val_ex and all(-100 in ex["labels"] for ex in run.val_ex)


def test_train_on_user_reaches_the_training_examples_only(tiny_model_dir, tmp_path):
    """Guards against `train_on_user` being ignored, against it labelling the system prompt, against it keeping a
    record none of whose reply fits (trained on its user text alone), and against it reaching the held-out examples
    (their loss counts the replies only)."""
    rows = [{"instruction": f"问题{i}", "input": "", "output": f"臣妾{i}。"} for i in range(8)]
    rows.append({"instruction": "问" * 200, "input": "", "output": "嗯。"})  # no reply token fits max_length=64
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    plain = prepare_run(tiny_cfg(tiny_model_dir, data, tmp_path / "a", system_prompt="SYSTEM", max_length=64))
    run = prepare_run(
        tiny_cfg(tiny_model_dir, data, tmp_path / "b", system_prompt="SYSTEM", max_length=64, train_on_user=True)
    )
    assert run.dropped == plain.dropped == {"train": 1, "val": 0}
    assert [ex["input_ids"] for ex in run.train_ex] == [ex["input_ids"] for ex in plain.train_ex]
    tok = run.tokenizer
    for ex, replies_only in zip(run.train_ex, plain.train_ex, strict=True):
        text = tok.decode([t for t in ex["labels"] if t != -100])
        reply = tok.decode([t for t in replies_only["labels"] if t != -100])
        assert text.startswith("问题") and text.endswith(reply) and "SYSTEM" not in text
    assert run.val_ex == plain.val_ex


def test_min_reply_chars_drops_short_training_replies_only(tiny_model_dir, tmp_path):
    """Guards against `min_reply_chars` being ignored, against it reaching the held-out records (their loss and the
    eval must see the data as it is), against it counting characters of the user turn instead of the reply, and
    against a filter that leaves nothing silently training on nothing."""
    rows = [{"instruction": "长长长长长长长长", "input": "", "output": f"是{i}。"} for i in range(6)]
    rows += [{"instruction": f"问题{i}", "input": "", "output": f"臣妾以为此事{i}不妥。"} for i in range(6)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    plain = prepare_run(tiny_cfg(tiny_model_dir, data, tmp_path / "a", val_size=4))
    run = prepare_run(tiny_cfg(tiny_model_dir, data, tmp_path / "b", val_size=4, min_reply_chars=5))
    long_replies = [r for r in plain.split.train if len(r.messages[-1]["content"]) >= 5]
    assert 0 < len(long_replies) < len(plain.split.train)
    assert run.split.train == long_replies and run.split.dropped_short == len(plain.split.train) - len(long_replies)
    assert run.split.val == plain.split.val and run.val_ex == plain.val_ex
    assert any("training records with replies under 5 characters dropped" in line for line in run.lines())
    with pytest.raises(DataError, match="min_reply_chars=50: no training record has a reply that long"):
        prepare_run(tiny_cfg(tiny_model_dir, data, tmp_path / "c", val_size=4, min_reply_chars=50))
    with pytest.raises(ConfigError, match="min_reply_chars"):
        TrainConfig(min_reply_chars=-1)


def test_eval_steps_minus_one_measures_no_held_out_loss(tiny_model_dir, tiny_dataset, tmp_path):
    """Guards against `eval_steps: -1` (the quickstart's: its eval measures held-out loss right after) still running
    the end-of-training held-out pass, and against 0 (only at the end) losing it."""
    never = train(tiny_cfg(tiny_model_dir, tiny_dataset, tmp_path / "never", max_steps=2, eval_steps=-1))
    at_end = train(tiny_cfg(tiny_model_dir, tiny_dataset, tmp_path / "end", max_steps=2, eval_steps=0))
    assert never.run_card["results"]["eval_loss"] is None
    assert "eval_loss" not in (never.output_dir / "metrics.jsonl").read_text(encoding="utf-8")
    assert at_end.run_card["results"]["eval_loss"] > 0
    with pytest.raises(ConfigError, match="eval_steps"):
        TrainConfig(eval_steps=-2)


def test_neftune_noises_the_training_embeddings_only(trained, tiny_model_dir, tmp_path):
    """Guards against `neftune_noise_alpha` being ignored (the losses would be the pinned noiseless ones) and against
    the noise outliving training (the returned model's embeddings would change from call to call)."""
    data = trained.run_card["dataset"]["path"]
    noisy = train(tiny_cfg(tiny_model_dir, data, tmp_path / "neftune", neftune_noise_alpha=5.0))
    assert _losses(noisy.output_dir)[:4] != pytest.approx(PINNED_LOSSES["packed"], abs=1e-4)
    assert noisy.run_card["config"]["neftune_noise_alpha"] == 5.0
    embeddings = noisy.model.get_input_embeddings().train()
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(embeddings(ids), embeddings(ids), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        TrainConfig(neftune_noise_alpha=-1.0)


def test_config_yaml_and_flags(tmp_path):
    """Guards against YAML quirks ('1e-4' is a string in YAML 1.1) and flags not winning over the file."""
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-4\nlora_r: 4\nlora_targets: [q_proj, v_proj]\nepochs: 3\n", encoding="utf-8")
    cfg = load_config(y, {"lora_r": 16, "epochs": None})
    assert cfg.lr == 1e-4 and cfg.lora_r == 16 and cfg.epochs == 3 and cfg.lora_targets == ["q_proj", "v_proj"]
    y.write_text("lora_rank: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown config key.*lora_rank"):
        load_config(y)
    with pytest.raises(ConfigError, match="--lora-dropout"):
        TrainConfig(lora_dropout=1.5)


@pytest.mark.parametrize("gpu_has_bf16", [True, False])
def test_precision_never_fp16_weights(monkeypatch, tiny_model_dir, tiny_dataset, tmp_path, gpu_has_bf16):
    """Guards against the seed's fp16 weights + fp16 optimizer state without loss scaling: on a GPU without bf16
    (faked here) the base is fp16 but autocast is fp16 with the Trainer's loss scaling, and the LoRA weights (so
    AdamW's state) are fp32; bf16 where the GPU has it; fp32 on the CPU."""
    monkeypatch.setattr("chatlora.model.cpu_bf16_speedup", lambda: None)
    cpu = pick_precision(torch.device("cpu"))
    assert cpu.weights == torch.float32 and cpu.amp is None
    with pytest.raises(ModelError):
        pick_precision(torch.device("cpu"), "fp16")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: gpu_has_bf16)
    cuda = torch.device("cuda")
    auto = pick_precision(cuda)
    assert auto == (Precision(torch.bfloat16, "bf16") if gpu_has_bf16 else Precision(torch.float16, "fp16"))
    assert pick_precision(cuda, "fp16") == Precision(torch.float16, "fp16")
    if not gpu_has_bf16:
        with pytest.raises(ModelError, match="bf16"):
            pick_precision(cuda, "bf16")

    # what the Trainer is told: fp16 autocast turns on its GradScaler (loss scaling), bf16 needs none
    cfg = tiny_cfg(tiny_model_dir, tiny_dataset, tmp_path / "o")
    args = training_args(cfg, auto, torch.device("cpu"), True, prepare_run(cfg).plan)
    assert (args.fp16, args.bf16) == ((False, True) if gpu_has_bf16 else (True, False))

    # the frozen base keeps the run's dtype; the trainable LoRA weights are fp32 whatever it is
    model = apply_lora(load_model(str(tiny_model_dir), auto.weights), 4, 8, 0.0, ["q_proj", "v_proj"])
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {auto.weights}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_cpu_bf16_autocasts_lora_and_keeps_its_weights_fp32(tiny_model_dir, tiny_dataset, tmp_path):
    """Guards against CPU bf16 runs (the CPU default where the CPU has bf16 units) computing LoRA in fp32 (the
    label-only loss bypassing accelerate's autocast), storing LoRA weights or AdamW state in bf16 (updates
    underflow), or scaling the loss."""
    probe = PrecisionProbe()
    result = train(tiny_cfg(tiny_model_dir, tiny_dataset, tmp_path / "o", dtype="bf16", eval_steps=0), [probe])
    assert_bf16_autocast(result, probe, _losses(result.output_dir))


def test_shipped_configs_load():
    """Guards against configs drifting from the TrainConfig fields."""
    root = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(root.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# ") and "chatlora" in first, f"{path.name} must start with the command that runs it"
        load_config(path)


def conversations(systems: list[str | None]) -> list[dict]:
    """Two-turn `messages` records, the i-th with system prompt ``systems[i]`` (None: no system message)."""
    rows = []
    for i, system in enumerate(systems):
        turns = [("Who goes there?", f"A friend, number {i}."), ("Your trade?", "I solve puzzles.")]
        messages = [{"role": "system", "content": system}] if system else []
        for user, reply in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        rows.append({"messages": messages})
    return rows


def test_user_data_without_system_prompts_trains_with_none(tiny_model_dir, tiny_dataset, tmp_path):
    """Guards against issue 22.6: a user's own data got chatlora's built-in 甄嬛 prompt in every record, and the run
    card called it the system prompt. Without one in the data or the flags, records train with none."""
    cfg = tiny_cfg(tiny_model_dir, tiny_dataset, tmp_path / "o", system_prompt=None, max_steps=1)
    run = prepare_run(cfg)
    assert "system prompt: none (the data has none; pass --system-prompt to add one)" in run.lines()
    texts = [run.tokenizer.decode(ex["input_ids"]) for ex in run.train_ex + run.val_ex]
    assert len(texts) == 12 and not any("system" in t or "甄嬛" in t for t in texts)
    assert all(t.startswith("<|im_start|>user\n") for t in texts)
    card = train(cfg).run_card
    assert card["template"]["system_prompt"] is None
    assert card["template"]["system_prompts"] == {
        "data": "none",
        "data_distinct": 0,
        "records": 12,
        "records_with_own": 0,
        "added": None,
        "trained_distinct": 0,
        "trained": None,
    }


@pytest.mark.parametrize(
    ("systems", "flag", "line"),
    [
        (["You are Holmes."] * 12, None, "system prompt: 'You are Holmes.' (the data's own, in 12 of 12 records)"),
        (
            [f"You are detective {i}." for i in range(12)],
            None,
            "system prompt: per conversation (12 distinct; the data's own in 12 of 12 records)",
        ),
        (
            ["You are Holmes."] * 6 + [None] * 6,
            "You are Watson.",
            "system prompt: per conversation (2 distinct; the data's own in 6 of 12 records; 'You are Watson.' "
            "(--system-prompt) added to the other 6)",
        ),
        (
            [None] * 12,
            "You are Watson.",
            "system prompt: 'You are Watson.' (--system-prompt, added to all 12 records)",
        ),
    ],
    ids=["shared", "per-conversation", "mixed", "flag"],
)
def test_plan_line_says_which_system_prompt_trains(tiny_model_dir, tmp_path, systems, flag, line):
    """Guards against a plan that does not say whether the run trains the data's prompts, one prompt, or none."""
    data = write_jsonl(tmp_path / "d.jsonl", conversations(systems))
    run = prepare_run(tiny_cfg(tiny_model_dir, data, tmp_path / "o", system_prompt=flag, val_size=0))
    assert line in run.lines()
    firsts = {run.tokenizer.decode(ex["input_ids"]).split("<|im_end|>")[0] for ex in run.train_ex}
    want = {f"<|im_start|>system\n{s or flag}" for s in systems}
    assert firsts == want


def test_huanhuan_configs_and_data_keep_the_built_in_prompt(tiny_model_dir, tmp_path, monkeypatch):
    """Guards against the Huanhuan runs losing their 甄嬛 prompt when the default stopped applying to every file: the
    configs name it, and the built-in data (the default --data) still brings it."""
    from chatlora.config import DEFAULT_SYSTEM_PROMPT
    from chatlora.show import show_records

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    tok = load_tokenizer(str(tiny_model_dir))
    for name in ("quickstart-cpu.yaml", "yi-6b-chat-huanhuan.yaml"):
        cfg = load_config(root / "configs" / name, {"model": str(tiny_model_dir)})
        assert cfg.added_system_prompt == DEFAULT_SYSTEM_PROMPT, name
        text = tok.decode([t.id for t in show_records(cfg, 1)[0].tokens])
        assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>"), name
    assert TrainConfig().added_system_prompt == DEFAULT_SYSTEM_PROMPT  # data/huanhuan.json
    assert TrainConfig(data=str(tmp_path / "mine.jsonl")).added_system_prompt is None
    assert TrainConfig(data="data/huanhuan.json", system_prompt="").added_system_prompt is None


# `chatlora train` that SIGKILLs itself at a chosen point: after step KILL_AT is logged (KILL_IN=step), or in the
# middle of checkpoint-KILL_AT's save, after the weights and optimizer, before the RNG and trainer state (=save).
# It patches only transformers' Trainer, so it does not depend on how chatlora.training.train is laid out.
KILL_SELF = """
import os, signal, sys
import transformers.trainer as T

at, where = int(os.environ["KILL_AT"]), os.environ["KILL_IN"]
original_log, original_rng = T.Trainer.log, T.Trainer._save_rng_state


def log(self, logs, *args, **kwargs):
    original_log(self, logs, *args, **kwargs)  # metrics.jsonl has its line for this step
    if where == "step" and "loss" in logs and self.state.global_step == at:
        os.kill(os.getpid(), signal.SIGKILL)


def save_rng_state(self, output_dir):
    if where == "save" and self.state.global_step == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_rng(self, output_dir)


T.Trainer.log, T.Trainer._save_rng_state = log, save_rng_state
from chatlora.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _kill_args(model, data, out) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--max-steps",
        "8",
        "--save-steps",
        "2",
        "--save-total-limit",
        "2",
        "--logging-steps",
        "1",
        "--eval-steps",
        "0",
        "--batch-size",
        "2",
        "--val-size",
        "2",
        "--lr",
        "5e-3",
        "--lora-dropout",
        "0",
        "--system-prompt",
        "S",
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """The run the killed and resumed runs must reproduce: 8 steps, checkpoints every 2, never killed."""
    from chatlora.cli import main

    tmp = tmp_path_factory.mktemp("uninterrupted")
    data = write_jsonl(
        tmp / "d.jsonl",
        [
            {"instruction": f"问题{i}", "input": "", "output": "臣妾做不到啊。" if i % 2 else "皇上万福金安。"}
            for i in range(12)
        ],
    )
    assert main(_kill_args(tiny_model_dir, data, tmp / "run")) == 0
    return data, tmp / "run"


def _loss_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.parametrize(("kill_in", "kill_at", "resumes_from"), [("step", 5, 4), ("save", 6, 4)])
def test_resume_after_kill_continues_the_curve(
    tiny_model_dir, uninterrupted, tmp_path, kill_in, kill_at, resumes_from
):
    """Guards against --resume after a `kill -9` (between checkpoints, or in the middle of writing one) restarting
    from scratch, resuming from a half-written checkpoint, duplicating or dropping loss points, or training other
    steps than an uninterrupted run: the resumed run's curve and adapter equal the uninterrupted run's."""
    from safetensors.torch import load_file

    from chatlora.cli import main

    data, reference = uninterrupted
    out = tmp_path / "run"
    script = tmp_path / "kill_self.py"
    script.write_text(KILL_SELF)
    env = {**os.environ, "KILL_AT": str(kill_at), "KILL_IN": kill_in}
    killed = subprocess.run(
        [sys.executable, str(script), *_kill_args(tiny_model_dir, data, out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "chatlora.json").exists()
    assert [r["step"] for r in _loss_rows(out)] == list(range(1, kill_at + 1)), "killed after logging its last step"
    assert (out / f"checkpoint-{resumes_from}" / "chatlora-complete.json").is_file()
    assert not (out / f"checkpoint-{kill_at}" / "chatlora-complete.json").exists()

    assert main([*_kill_args(tiny_model_dir, data, out), "--resume"]) == 0
    card = json.loads((out / "chatlora.json").read_text())
    assert card["results"]["global_step"] == 8
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "begin"] == [0, resumes_from]
    assert [r["step"] for r in _loss_rows(out)] == list(range(1, 9)), "the curve continues without gaps or duplicates"
    assert [r["loss"] for r in _loss_rows(out)] == pytest.approx([r["loss"] for r in _loss_rows(reference)], abs=1e-5)
    resumed, expected = (load_file(d / "adapter_model.safetensors") for d in (out, reference))
    assert resumed.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(resumed[name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_layers_adapts_the_last_layers_only(tiny_model_dir, tiny_dataset, tmp_path, capsys):
    """Guards against --lora-layers adapting every layer (no backward saved), the wrong end of the stack, or a
    count past the model's layers failing after the weights load instead of before (exit 2, nothing written)."""
    from safetensors import safe_open

    out = tmp_path / "top1"
    args = ["train", "--model", str(tiny_model_dir), "--data", str(tiny_dataset), "--output-dir", str(out)]
    args += ["--max-steps", "1", "--val-size", "2", "--eval-steps", "0", "--save-steps", "100", "--lora-r", "2"]
    assert main([*args, "--lora-layers", "1"]) == 0
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        layers = {k.split("layers.")[1].split(".")[0] for k in f.keys()}
    assert layers == {"1"}  # the tiny model has layers 0 and 1: only the last is adapted
    capsys.readouterr()
    assert main([*args[:6], str(tmp_path / "too-many"), *args[7:], "--lora-layers", "3", "--dry-run"]) == 2
    assert "--lora-layers 3: this model has 2 decoder layers" in capsys.readouterr().err
    assert not (tmp_path / "too-many").exists()


LAUNCH = [
    (
        "deepspeed-missing",
        None,
        ["--deepspeed", "DS"],
        "needs the deepspeed package, which is not installed: pip install deepspeed",
    ),
    ("fsdp-no-world-size", None, ["--fsdp"], "torchrun --nproc_per_node N -m chatlora train ..."),
    ("fsdp-world-size-1", "1", ["--fsdp"], "but this is a single process (WORLD_SIZE 1)"),
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize(("name", "world_size", "flags", "message"), LAUNCH, ids=[c[0] for c in LAUNCH])
def test_unlaunchable_run_exits_2_before_loading_in_dry_run_and_run_alike(
    tiny_model_dir, tmp_path, capsys, monkeypatch, name, world_size, flags, message, dry_run
):
    """Guards against `--deepspeed` without deepspeed installed, or `--fsdp` in a single process (no torchrun),
    passing `--dry-run` with exit 0 (a plan for "several processes") while the real run crashes with exit 1: both
    must exit 2 with one line naming the package to install or the launch command, before any model loads."""
    import chatlora.training.train

    def no_model(*args, **kwargs):
        raise AssertionError("the launch must be refused before any model loads")

    monkeypatch.setattr(chatlora.training.train, "load_model", no_model)
    monkeypatch.setattr(chatlora.training.train, "_deepspeed_installed", lambda: False)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    ds = tmp_path / "zero2.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}', encoding="utf-8")
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": "an answer"} for i in range(8)])
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output-dir", str(tmp_path / "out")]
    argv += [str(ds) if f == "DS" else f for f in flags] + ["--device", "cpu", "--max-steps", "1"]
    assert main(argv + ["--dry-run"] * dry_run) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chatlora: error: ") and message in err, err
    assert not (tmp_path / "out").exists()

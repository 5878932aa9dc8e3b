"""Padding-free batches and the label-only loss: same per-sample loss and gradients as plain padded batches."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from chatlora.config import ConfigError, TrainConfig
from chatlora.model import apply_lora, load_model
from chatlora.packing import PackedDataset, collate, pack_rows, plan_batches, plan_buckets
from chatlora.training.kernels import label_only_loss
from chatlora.training.train import prepare_run, train


def _examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Random conversations: a prompt (label -100) then a reply (labels = ids), lengths 5..40."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, r = rng.randint(2, 15), rng.randint(3, 25)
        ids = [rng.randrange(3, vocab) for _ in range(p + r)]
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def _per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of one conversation (labels unshifted, HF convention)."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100)


def test_pack_rows_fills_rows_without_overflow_and_uses_each_example_once():
    """Guards against a packer that drops, duplicates or overfills (cut conversations)."""
    lengths = [random.Random(1).randint(1, 100) for _ in range(200)]
    rows = pack_rows(lengths, 128)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert sum(lengths) / (128 * len(rows)) > 0.9, "first-fit-decreasing should leave little padding"
    batches = plan_batches(lengths, 128, 512, seed=0)
    assert all(len(b) <= 4 for b in batches) and sum(len(b) for b in batches) == len(rows)


def test_collate_pack_restarts_positions_and_masks_each_first_label():
    """Guards against a conversation's first token being trained as the continuation of the previous one."""
    rows = [
        [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}],
        [{"input_ids": [4], "labels": [4]}],
    ]
    b = collate(rows, pad_id=0, layout="pack", label_index=True)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, -100, -100, -100, -100]]
    assert "attention_mask" not in b and b["num_real_tokens"] == 6
    assert b["label_index"].tolist() == [0, 1, 3]  # flat positions in labels[:, 1:]


def test_collate_bucket_pads_right_without_mask_or_positions():
    """Guards against the bucket layout growing an attention mask or position_ids (either takes attention off the
    fused causal kernels) or masking a first label, and against the padded layout counting real tokens (the
    Trainer counts those batches itself: they would be counted twice)."""
    rows = [[{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}], [{"input_ids": [8], "labels": [8]}]]
    b = collate(rows, pad_id=0, layout="bucket", label_index=True)
    assert sorted(b) == ["input_ids", "label_index", "labels", "num_real_tokens"]
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    assert b["num_real_tokens"] == 4 and b["label_index"].tolist() == [0, 1]
    padded = collate([row[0] for row in rows], pad_id=0)
    assert sorted(padded) == ["attention_mask", "input_ids", "labels"]
    assert padded["labels"].tolist() == b["labels"].tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_gives_the_same_per_sample_loss_as_one_at_a_time(tiny_model_dir, attn):
    """Guards against tokens attending across packed conversations (position_ids restarts must split attention)."""
    model = load_model(str(tiny_model_dir)).eval()
    model.config._attn_implementation = attn
    model.config.use_cache = False
    exs = _examples(9, model.config.vocab_size)
    rows = [[exs[i] for i in row] for row in pack_rows([len(e["input_ids"]) for e in exs], 64)]
    assert any(len(r) > 1 for r in rows), "the test needs rows holding several conversations"
    with torch.no_grad():
        want = {
            id(e): _per_sample_loss(
                model(input_ids=torch.tensor([e["input_ids"]])).logits[0], torch.tensor(e["labels"])
            )
            for e in exs
        }
        b = collate(rows, pad_id=0, layout="pack")
        logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        leaky = model(input_ids=b["input_ids"]).logits  # no restarts: later conversations see earlier ones
    differs = False
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            labels = torch.tensor(e["labels"])
            got = _per_sample_loss(logits[r, at : at + n], labels)
            torch.testing.assert_close(got, want[id(e)], rtol=1e-5, atol=1e-5)
            differs |= at > 0 and not torch.allclose(_per_sample_loss(leaky[r, at : at + n], labels), want[id(e)])
            at += n
    assert differs, "without position restarts the losses must differ, else this test proves nothing"


def _lora_model(model_dir):
    torch.manual_seed(0)
    model = apply_lora(load_model(str(model_dir)), 4, 8, 0.0, ["q_proj", "v_proj", "down_proj"])
    for n, p in model.named_parameters():  # lora_B starts at 0: give it values so its gradient path is exercised
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    model.config.use_cache = False
    return model


def _loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("strategy", ["pack", "bucket"])
def test_packed_label_only_training_step_equals_padded_full_loss_step(tiny_model_dir, strategy):
    """Guards against packing or the label-only LM head changing the training signal (loss or LoRA gradients)."""
    model = _lora_model(tiny_model_dir)
    exs = _examples(10, model.config.vocab_size, seed=3)
    padded = collate(exs, pad_id=0)
    want, want_g = _loss_and_grads(model, lambda: model(**padded).loss)
    lengths = [len(e["input_ids"]) for e in exs]
    if strategy == "pack":
        plan = [row for batch in plan_batches(lengths, 64, 10**6) for row in batch]
        b = collate([[exs[i] for i in row] for row in plan], pad_id=0, layout="pack", label_index=True)
    else:
        plan = [row for batch in plan_buckets(lengths, 10**6) for row in batch]
        b = collate([[exs[i] for i in row] for row in plan], pad_id=0, layout="bucket", label_index=True)
    b.pop("num_real_tokens")
    got, got_g = _loss_and_grads(model, lambda: label_only_loss(model, b))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, g in want_g.items():
        torch.testing.assert_close(got_g[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_label_only_loss_uses_the_accumulation_window_count(tiny_model_dir):
    """Guards against grad accumulation weighting micro-batches by their own label count (HF's old GA bug)."""
    model = _lora_model(tiny_model_dir)
    b = collate(_examples(4, model.config.vocab_size), pad_id=0)
    n = int((b["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        assert torch.allclose(label_only_loss(model, b, num_items_in_batch=2 * n), label_only_loss(model, b) / 2)


def test_train_with_packing_runs_and_counts_real_tokens(tiny_model_dir, tiny_dataset, tmp_path):
    """Guards against the packed path breaking the run card, held-out loss or the tokens/s metric: in one process
    the tokens seen are exactly the real tokens of the micro-batches trained on (no padding, each counted once)."""
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        data=str(tiny_dataset),
        output_dir=str(tmp_path / "o"),
        max_steps=3,
        val_size=2,
        logging_steps=1,
        eval_steps=0,
        save_steps=3,
        lr=5e-3,
        system_prompt="S",
        packing=True,
        logits_at_labels=True,
        tokens_per_batch=256,
        max_length=128,
    )
    run = prepare_run(cfg)
    batches = run.plan.batches
    # one micro-batch per step, three per epoch: the three steps train on every training conversation once
    assert (batches.micro_batches_per_step, batches.micro_batches_per_epoch) == (1, 3)
    real_tokens = sum(len(ex["input_ids"]) for ex in run.train_ex)
    res = train(cfg).run_card["results"]
    assert res["global_step"] == 3 and res["eval_loss"] is not None
    assert res["tokens_seen"] == real_tokens
    ds = PackedDataset([{"input_ids": [1] * 100, "labels": [1] * 100}] * 5, 128, 256)
    assert len(ds) == 3  # five 100-token rows, two rows per 256-token micro-batch


def test_packing_config_is_validated():
    """Guards against a token budget that cannot hold one max-length conversation."""
    with pytest.raises(ConfigError, match="--tokens-per-batch"):
        TrainConfig(tokens_per_batch=100, max_length=384)
    with pytest.raises(ConfigError, match="--packing-strategy"):
        TrainConfig(packing_strategy="zigzag")

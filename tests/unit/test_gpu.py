"""The CUDA paths on tiny models: precision (bf16, fp16 with loss scaling), autocast, the compiled default, Liger,
QLoRA. Skipped without a CUDA GPU.

Run on a GPU machine with ``python -m pytest -m gpu tests/unit/test_gpu.py`` (bitsandbytes for the QLoRA test,
liger-kernel for the Liger test; each skips without its package).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model_dir, write_jsonl
from probes import PrecisionProbe, assert_bf16_autocast

from chatlora.config import TrainConfig
from chatlora.training.train import prepare_run, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _data(tmp_path):
    rows = [
        {"instruction": f"问题{i}", "input": "", "output": "臣妾做不到啊。" if i % 2 else "皇上万福金安。"}
        for i in range(24)
    ]
    return write_jsonl(tmp_path / "d.jsonl", rows)


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        model=str(make_model_dir(tmp_path / "model")),
        data=str(_data(tmp_path)),
        output_dir=str(tmp_path / "out"),
        max_steps=12,
        batch_size=4,
        val_size=2,
        logging_steps=1,
        eval_steps=0,
        save_steps=100,
        lr=5e-3,
        lora_dropout=0.0,  # compiled and eager dropout draw different masks; the loss comparisons need none
        system_prompt="S",
    )
    base.update(kw)
    return TrainConfig(**base)


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def eager_bf16(tmp_path_factory):
    """The bf16 run without compile or Liger (the default label-only head and packing), with a probe."""
    probe = PrecisionProbe()
    result = train(_cfg(tmp_path_factory.mktemp("eager"), dtype="bf16", compile=False, liger=False), [probe])
    return result, probe


def test_bf16_autocasts_lora_and_keeps_its_weights_fp32(eager_bf16):
    """Guards against the label-only loss bypassing the Trainer's autocast (every LoRA matmul then runs in fp32:
    measured 26 % of GPU time), bf16 LoRA weights or optimizer state (updates underflow), or a loss scaler in bf16."""
    result, probe = eager_bf16
    assert_bf16_autocast(result, probe, _losses(result.output_dir))


def test_fp16_autocasts_in_fp16_and_scales_the_loss(tmp_path):
    """Guards against the seed tutorial's fp16 training without loss scaling (small gradients flush to zero) and
    against fp16 runs computing LoRA in fp32 or bf16."""
    probe = PrecisionProbe()
    result = train(_cfg(tmp_path, dtype="fp16", compile=False, liger=False), [probe])
    assert probe.lora_out_dtypes == {torch.float16}
    assert probe.loss_scales and all(s is not None and s > 1 for s in probe.loss_scales)
    assert result.run_card["results"]["fp16_skipped_steps"] is not None


def test_default_plan_on_one_gpu_is_the_compiled_fast_path(tmp_path, eager_bf16):
    """Guards against the speed-ups existing only behind flags: a plain run on one GPU must pack, use the
    label-only head and compile, and the run card must say so; and against the compiled layers computing other
    losses than the eager ones (same bf16 run, compile off)."""
    cfg = _cfg(tmp_path, dtype="bf16")
    plan = prepare_run(cfg).plan
    assert plan.packing and plan.logits_at_labels and plan.compile and not plan.memory_mode
    result = train(cfg)
    card = result.run_card
    assert card["plan"]["compile"] and card["hardware"]["precision"] == "bf16"
    assert card["hardware"]["peak_gpu_memory_gib"] > 0 and card["hardware"]["estimated_peak_gib"] > 0
    assert _losses(result.output_dir) == pytest.approx(_losses(eager_bf16[0].output_dir), abs=0.02)


def test_fp16_keeps_the_base_in_fp16_and_lora_in_fp32(tmp_path):
    """Guards against the T4 path loading the whole model in fp32 (a 6B model then needs 24 GiB) or training
    fp16 LoRA weights (updates underflow)."""
    result = train(_cfg(tmp_path, dtype="fp16"))
    params = dict(result.model.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.float16}
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    card = result.run_card
    assert card["hardware"]["base_dtype"] == "float16" and card["results"]["fp16_skipped_steps"] is not None
    losses = _losses(result.output_dir)
    assert all(x == x for x in losses) and losses[-1] < losses[0]


def test_qlora_trains_reloads_in_4bit_and_merges_into_full_precision(tmp_path, caplog):
    """Guards against --quantize 4bit not quantizing, chat reloading the adapter on another base than it was
    trained on, and merge rounding the update into 4-bit weights."""
    bnb = pytest.importorskip("bitsandbytes")
    from chatlora.inference.infer import ChatModel
    from chatlora.merge import merge

    result = train(_cfg(tmp_path, quantize="4bit"))
    layer = result.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    assert {p.dtype for n, p in result.model.named_parameters() if "lora_" in n} == {torch.float32}
    assert result.run_card["base_model"]["quantize"] == "4bit"
    losses = _losses(result.output_dir)
    assert losses[-1] < losses[0]

    chat = ChatModel.load(result.output_dir, device="cuda")
    reloaded = chat.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(reloaded, bnb.nn.Linear4bit)
    assert chat.generate([{"role": "user", "content": "问题1"}]).finish_reason in ("stop", "length")

    with caplog.at_level("WARNING"):
        merged = merge(result.output_dir, tmp_path / "merged")
    assert "full-precision base" in caplog.text
    card = json.loads((merged / "chatlora.json").read_text())
    assert "4bit" in card["merged_from"]["merged_into"]
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(merged)
    assert isinstance(full.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert not isinstance(full.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_liger_kernels_are_applied_and_match_the_eager_losses(tmp_path, eager_bf16):
    """Guards against --liger silently training without Liger's kernels, or with kernels that change the loss
    (same bf16 run without them). Last in the file: Liger patches transformers' Llama RoPE for the whole process."""
    pytest.importorskip("liger_kernel")
    result = train(_cfg(tmp_path, dtype="bf16", compile=False, liger=True))
    assert result.run_card["plan"]["liger"]
    assert any(m._get_name().startswith("Liger") for m in result.model.modules())
    assert _losses(result.output_dir) == pytest.approx(_losses(eager_bf16[0].output_dir), abs=0.02)


def test_engine_graphs_decode_like_eager_steps_with_mixed_adapters(tmp_path):
    """Bug: a captured decode step replayed stale inputs (a buffer re-allocated after the capture, a write column or
    an adapter mask baked in), or every capture failed and the engine fell back to eager steps unnoticed. In fp32 the
    graph and eager paths agree token for token, with rows joining and leaving, two adapters and the base."""
    from peft import PeftModel
    from serving import make_adapter
    from transformers import AutoModelForCausalLM

    from chatlora.inference.infer import BASE, ChatModel, SamplingConfig
    from chatlora.model import load_tokenizer

    base_dir = make_model_dir(tmp_path / "model")
    dirs = {name: make_adapter(base_dir, tmp_path / name, seed) for name, seed in (("alpha", 1), ("beta", 2))}
    net = AutoModelForCausalLM.from_pretrained(str(base_dir)).cuda()
    net = PeftModel.from_pretrained(net, str(dirs["alpha"]), adapter_name="alpha")
    net.load_adapter(str(dirs["beta"]), adapter_name="beta")
    tok = load_tokenizer(str(base_dir))
    tok.padding_side = "left"
    views = [
        ChatModel(net, tok, None, name, adapter=a)
        for name, a in (("base", BASE), ("alpha", "alpha"), ("beta", "beta"))
    ]
    engine = views[0].engine
    assert engine.graphs, "CUDA graphs should be on by default on CUDA"
    prompts = ["hi", "hello there, how are you today? " * 3, "a b c d e", "f"] * 3

    def replies(graphs: bool) -> list[list[int]]:
        engine.graphs = graphs
        rows = [
            views[i % 3].row(
                views[i % 3].prompt_ids([{"role": "user", "content": p}]),
                SamplingConfig(max_new_tokens=4 + 3 * (i % 4), temperature=0),
            )
            for i, p in enumerate(prompts)
        ]
        views[0].run(rows, batch_size=4)
        return [r._tokens for r in rows]

    eager = replies(False)
    graphed = replies(True)
    assert engine._graph_set, "the decode steps should have been captured (a failed capture falls back to eager)"
    assert graphed == eager

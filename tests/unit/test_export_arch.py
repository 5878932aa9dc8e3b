"""GGUF export of each architecture (mistral, qwen3, gemma2, gemma3) and its quirks, on tiny random models.

Each model gets its family's kind of tokenizer and chat template: Mistral and Gemma a real sentencepiece vocabulary
(Llama 2's, from llama.cpp's ``ggml-vocab-llama-spm.gguf``; Gemma's turn markers added), qwen3 Qwen2's real
byte-level BPE with ChatML.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
from chat_templates import FAMILIES
from conftest import VOCAB_DIR, edited_tokenizer, vocab_tokenizer
from test_export import failed, make_bpe_tokenizer, make_model_dir, statuses, train_adapter

import chatlora.export.writer as writer
from chatlora.cli import main
from chatlora.export import export
from chatlora.template import render_text

ARCHS = ["mistral", "qwen3", "gemma2", "gemma3_text"]
CONVERSION = (
    "model config",
    "tokenizer",
    "chat template (GGUF)",
    "BOS once",
    "stop tokens (EOS/EOT)",
    "greedy replies",
)


def family_tokenizer(arch: str):
    """The tokenizer kind ``arch``'s models ship, with the family's chat template."""
    if arch == "qwen3":
        return vocab_tokenizer("qwen2")
    if arch == "mistral":
        return vocab_tokenizer("llama-spm", FAMILIES["mistral"][0])
    from transformers import AutoTokenizer

    spm = AutoTokenizer.from_pretrained(str(VOCAB_DIR / "llama-spm"))  # a copy: vocab_tokenizer's is shared

    def gemma_shape(backend: dict) -> None:  # no word-start space added anywhere, so none stripped when decoding
        backend["pre_tokenizer"]["prepend_scheme"] = "never"
        backend["decoder"]["decoders"] = [d for d in backend["decoder"]["decoders"] if d["type"] != "Strip"]

    template = FAMILIES["gemma2" if arch == "gemma2" else "gemma3"][0]
    return edited_tokenizer(spm, gemma_shape, ["<start_of_turn>", "<end_of_turn>"], template)


def make_run(tmp, arch: str, seed: int = 0, **config):
    tok = family_tokenizer(arch)
    base = make_model_dir(tmp / "base", tok, arch=arch, tie=arch.startswith("gemma"), seed=seed, **config)
    # LoRA weights at 0.05, not test_export's 0.3: with 0.3 the merged weights are LoRA-dominated and a random
    # 2-layer llama graph so sensitive that rounding its embeddings to q8_0 alone moves logits by ~1 std (top-1 vs
    # fp32 ~85 % on a 32k vocabulary, for llama as for mistral); the conversion itself was exact either way.
    return train_adapter(tmp, base, system_prompt="", lora_std=0.05)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run per architecture, shared by this module's tests (built on first use)."""
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = make_run(tmp_path_factory.mktemp(arch), arch)
        return made[arch]

    return get


@pytest.fixture(scope="module", params=ARCHS)
def arch_run(request, runs):
    return request.param, runs(request.param)


def reader_of(result) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(result.files[0])
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    return meta, {t.name: t for t in reader.tensors}


def test_q8_0_export_passes_every_check(arch_run, tmp_path):
    """Guards against an architecture whose GGUF loads but computes differently from the adapter it came from."""
    arch, run = arch_run
    result = export(run, tmp_path / "q8", quant="q8_0", max_new_tokens=12)
    assert result.passed, failed(result.checks)
    got = statuses(result.checks)
    assert all(got[name] == "PASS" for name in (*CONVERSION, "top-1 agreement"))
    meta, tensors = reader_of(result)
    gguf_arch = {"mistral": "llama", "gemma3_text": "gemma3"}.get(arch, arch)
    assert meta["general.architecture"] == gguf_arch
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32}
    if arch in ("qwen3", "gemma3_text"):
        assert tensors["blk.0.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    if arch == "qwen3":
        assert meta["qwen3.attention.key_length"] == 32  # head_dim 32 != hidden 64 / 4 heads
    if arch == "gemma2":
        assert meta["gemma2.attn_logit_softcapping"] == 3.0 and meta["gemma2.final_logit_softcapping"] == 2.0
        assert meta["gemma2.attention.sliding_window"] == 6 and "output.weight" not in tensors
    if arch == "gemma3_text":
        assert meta["gemma3.attention.sliding_window_pattern"] == [True, False]
        assert meta["gemma3.rope.freq_base"] == 5000.0 and meta["gemma3.rope.freq_base_swa"] == 100.0


def test_lora_only_gguf(arch_run, tmp_path):
    """Guards against a LoRA GGUF whose names, Q/K order or architecture llama.cpp's base tensors do not match."""
    arch, run = arch_run
    result = export(run, tmp_path / "lora", lora_only=True, max_new_tokens=12)
    assert result.passed, failed(result.checks)
    meta, tensors = reader_of(result)
    assert meta["general.architecture"] == {"mistral": "llama", "gemma3_text": "gemma3"}.get(arch, arch)
    assert len(tensors) == 2 * 7 * 2 and "blk.1.ffn_down.weight.lora_b" in tensors


def skip_call(monkeypatch, method: str) -> None:
    """The exporter forgets one GGUF key: ``GGUFWriter.<method>`` writes nothing."""
    monkeypatch.setattr(gguf.GGUFWriter, method, lambda self, *a, **k: None)


def test_gemma_norm_offset_is_required(runs, tmp_path, monkeypatch):
    """Guards against writing Gemma's norm weights as HF stores them: llama.cpp multiplies by w, HF by 1 + w."""
    monkeypatch.setattr(writer, "_norm_offset", lambda name, arch: 0.0)
    bad = failed(export(runs("gemma2"), tmp_path / "x", quant="f16", max_new_tokens=12).checks)
    assert "greedy replies" in bad and "top-1 agreement" in bad


def test_qwen3_qk_norms_are_required(runs, tmp_path, monkeypatch):
    """Guards against dropping qwen3's per-head Q/K norms (llama.cpp's qwen3 graph needs attn_q_norm/attn_k_norm)."""
    tensors = writer._gguf_tensors
    monkeypatch.setattr(
        writer, "_gguf_tensors", lambda m, s: (t for t in tensors(m, s) if not re.search(r"attn_[qk]_norm", t[0]))
    )
    bad = failed(export(runs("qwen3"), tmp_path / "x", quant="f16", max_new_tokens=12).checks)
    assert "greedy replies" in bad


def test_qwen3_head_dim_is_required(runs, tmp_path, monkeypatch):
    """Guards against leaving out key_length when head_dim != hidden / heads: llama.cpp would split heads wrongly."""
    skip_call(monkeypatch, "add_key_length")
    bad = failed(export(runs("qwen3"), tmp_path / "x", quant="f16", max_new_tokens=12).checks)
    assert "the GGUF does not load" in bad["model config"]


def test_mistral_qk_permutation_is_required(runs, tmp_path, monkeypatch):
    """Guards against treating mistral as a non-llama graph: llama.cpp runs it as llama, with Q/K rows permuted."""
    monkeypatch.setattr(writer, "_PERMUTED", {"llama"})
    bad = failed(export(runs("mistral"), tmp_path / "x", quant="f16", max_new_tokens=12).checks)
    assert "greedy replies" in bad


@pytest.mark.parametrize(
    "arch, method, message",
    [
        ("gemma2", "add_attn_logit_softcapping", "attn_logit_softcapping 3.0 vs 50.0"),
        ("gemma2", "add_final_logit_softcapping", "final_logit_softcapping 2.0 vs 30.0"),
        ("gemma2", "add_sliding_window", "sliding_window 6 vs 4096"),
        (
            "gemma3_text",
            "add_sliding_window_pattern",
            "'full_attention'] vs ['sliding_attention', 'sliding_attention']",
        ),
        ("gemma3_text", "add_rope_freq_base_swa", "sliding rope_theta 100.0 vs 10000.0"),
    ],
)
def test_gemma_hparams_are_required(runs, tmp_path, monkeypatch, arch, method, message):
    """Guards against a Gemma key left out, which llama.cpp silently replaces by its default (50, 30, 4096, ...).

    The model config row catches each: the held-out prompts are too short for the sliding window to change every
    greedy reply, and final soft-capping (a monotonic tanh) never changes the top token, only sampling.
    """
    skip_call(monkeypatch, method)
    bad = failed(export(runs(arch), tmp_path / "x", quant="f16", max_new_tokens=12).checks)
    assert message in bad.get("model config", ""), bad


def test_mistral_sliding_window_caps_the_context(tmp_path):
    """Guards against a Mistral GGUF claiming a context beyond its sliding window, where llama.cpp's llama graph
    (full attention) would attend to tokens the model never sees."""
    result = export(make_run(tmp_path, "mistral", sliding_window=64), tmp_path / "x", quant="f16", max_new_tokens=8)
    assert result.passed, failed(result.checks)
    meta, _ = reader_of(result)
    assert meta["llama.context_length"] == 64
    assert "context 64" in {c.name: c.detail for c in result.checks}["model config"]


@pytest.mark.parametrize(
    "arch, config, message",
    [
        ("phi3", {}, "GGUF export supports the llama (Llama 2/3, Yi, SmolLM), mistral, qwen2, qwen3, gemma2 and "),
        ("gemma2", {"query_pre_attn_scalar": 256}, "scales queries by 1/sqrt(16) for 2 layers"),
        ("gemma2", {"final_logit_softcapping": None}, "always soft-caps attention and final logits"),
        ("mistral", {"hidden_act": "gelu"}, "llama.cpp's llama graph uses silu in the MLP; this model uses 'gelu'"),
    ],
)
def test_unsupported_models_are_refused_in_one_line(tmp_path, capsys, arch, config, message):
    """Guards against writing a model llama.cpp would run differently instead of saying what is supported."""
    tok = make_bpe_tokenizer("qwen2", template=None)
    base = make_model_dir(tmp_path / "base", tok, arch=arch, tie=arch.startswith("gemma"), **config)
    capsys.readouterr()
    assert main(["export", "--model", str(base), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_llama_cpp_computes_what_the_check_reloads(runs, tmp_path):
    """Guards against the parity check's reading of a GGUF (transformers + llama.cpp's defaults) drifting from
    llama.cpp's own: llama.cpp's logits on an f32 export equal the reloaded model's, for every architecture."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch

    from chatlora.export.parity import _load_gguf

    conv = [{"role": "user", "content": "你是谁？我是甄嬛。 12345 Hello world, this is a tiny tokenizer."}]
    for arch in ARCHS:
        result = export(runs(arch), tmp_path / arch, quant="f32", check=False)
        model, _ = _load_gguf(result.output_dir, result.files[0].name)
        tok = family_tokenizer(arch)
        ids = tok(render_text(conv, tok, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        assert len(ids) > 12  # beyond the sliding window (6) of the Gemma models
        llm = llama_cpp.Llama(str(result.files[0]), logits_all=True, verbose=False, n_ctx=64, n_threads=1)
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
        with torch.inference_mode():
            want = model(torch.tensor([ids])).logits[0].numpy()
        assert (got.argmax(-1) == want.argmax(-1)).all(), arch
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max(), arch


def test_llama_cpp_applies_each_lora_gguf(runs, tmp_path, monkeypatch, broken=False):
    """Guards against a LoRA GGUF llama.cpp loads but applies differently from PEFT (names, Q/K order, scale): on
    the base's f32 GGUF, ``--lora`` brings llama.cpp's logits to the adapter's (its error shrinks ten-fold; with
    mistral's lora_b rows left in HF's order it does not)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch

    from chatlora.export.source import _open_source, _reference_model

    if broken:
        monkeypatch.setattr("chatlora.export.lora._permute", lambda w, n: w)
    conv = [{"role": "user", "content": "你是谁？我是甄嬛。 12345 Hello world, this is a tiny tokenizer."}]
    for arch in ["mistral"] if broken else ARCHS:
        run = runs(arch)
        base = export(model=run.parent / "base", output=tmp_path / arch / "base", quant="f32", check=False)
        lora = export(run, tmp_path / arch / "lora", lora_only=True, check=False)
        tok = family_tokenizer(arch)
        ids = tok(render_text(conv, tok, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            want = _reference_model(_open_source(run, None))(torch.tensor([ids])).logits[0].numpy()
        errors = []
        for extra in ({"lora_path": str(lora.files[0])}, {}):
            llm = llama_cpp.Llama(str(base.files[0]), logits_all=True, verbose=False, n_ctx=64, n_threads=1, **extra)
            llm.eval(ids)
            errors.append(np.abs(np.array(llm.scores[: len(ids)]) - want).max())
        assert errors[0] < 0.1 * errors[1], (arch, errors)


def test_llama_cpp_lora_check_catches_hf_qk_order(runs, tmp_path, monkeypatch):
    """The test above, made to fail once: lora_b of mistral's Q/K written in HF's row order."""
    with pytest.raises(AssertionError, match="mistral"):
        test_llama_cpp_applies_each_lora_gguf(runs, tmp_path, monkeypatch, broken=True)

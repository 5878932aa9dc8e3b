"""Architectures: hyperparameters, tensor names and each architecture's quirks as llama.cpp reads them."""

from __future__ import annotations

import gguf
import numpy as np

from ..errors import ModelError
from .quants import _Q, Quant

# HF model_type -> llama.cpp architecture. Mistral is llama's graph (llama.cpp's own converter writes it so).
_ARCHS = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma2": gguf.MODEL_ARCH.GEMMA2,
    "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
}
SUPPORTED = "llama (Llama 2/3, Yi, SmolLM), mistral, qwen2, qwen3, gemma2 and gemma3 (text)"
_PERMUTED = {"llama", "mistral"}  # llama.cpp's llama graph wants Q/K rows in its RoPE order; the others keep HF's
_NORM_OFFSET = {"gemma2", "gemma3_text"}  # HF Gemma's RMSNorm multiplies by 1 + w, llama.cpp's by w: store w + 1
_GELU = {"gemma2", "gemma3_text"}  # llama.cpp's Gemma FFN is GELU (tanh approximation), the others' SiLU
_SWA_PATTERN = {"gemma2": 2, "gemma3_text": 6}  # llama.cpp's default: every Nth layer full, the rest sliding
_BIG_LAYERS = {"gemma2": 46, "gemma3_text": 62}  # the 27B sizes, where llama.cpp scales queries by hidden / heads


def _arch(config) -> str:
    arch = getattr(config, "model_type", None)
    if arch not in _ARCHS:
        raise ModelError(f"GGUF export supports the {SUPPORTED} architectures; this model is {arch!r}")
    return arch


def _gguf_arch(arch: str) -> str:
    """llama.cpp's ``general.architecture`` for an HF model_type (``mistral`` -> ``llama``)."""
    return gguf.MODEL_ARCH_NAMES[_ARCHS[arch]]


def _rope_params(config, layer_type: str = "full_attention") -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in params or "sliding_attention" in params:  # per layer type (Gemma 3)
        return params.get(layer_type) or {}
    return params


def _rope_theta(config, layer_type: str = "full_attention") -> float:
    """The RoPE base of ``layer_type`` layers (Gemma 3 has one for full and one for sliding attention)."""
    params = _rope_params(config, layer_type)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ModelError(f"RoPE scaling {rope_type!r} is not written by chatlora export (only plain RoPE)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ModelError("the model config names no rope_theta")
    return float(theta)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _context_length(config, arch: str) -> int:
    """Mistral's sliding window, which llama.cpp's llama graph lacks, caps the context: below it the two agree."""
    window = getattr(config, "sliding_window", None) if arch == "mistral" else None
    return min(config.max_position_embeddings, window or config.max_position_embeddings)


def _sliding_layers(config) -> list[bool]:
    return [t == "sliding_attention" for t in config.layer_types]


def _check_supported(config, arch: str) -> None:
    """Refuse what llama.cpp's graph for ``arch`` would compute differently from the HF model, with the reason."""
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    want = "gelu_pytorch_tanh" if arch in _GELU else "silu"
    if act != want:
        raise ModelError(f"llama.cpp's {_gguf_arch(arch)} graph uses {want} in the MLP; this model uses {act!r}")
    if getattr(config, "use_sliding_window", False):
        raise ModelError("sliding-window attention is not written by chatlora export for qwen2/qwen3")
    if arch not in _NORM_OFFSET:
        return
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelError("bidirectional attention (an embedding model) is not a chat model llama.cpp runs")
    scale = (
        config.hidden_size // config.num_attention_heads
        if config.num_hidden_layers == _BIG_LAYERS[arch]
        else _head_dim(config)
    )
    if config.query_pre_attn_scalar != scale:
        raise ModelError(
            f"query_pre_attn_scalar is {config.query_pre_attn_scalar} but llama.cpp's {_gguf_arch(arch)} graph "
            f"scales queries by 1/sqrt({scale}) for {config.num_hidden_layers} layers"
        )
    if arch == "gemma2":
        if not config.attn_logit_softcapping or not config.final_logit_softcapping:
            raise ModelError(
                "llama.cpp's gemma2 graph always soft-caps attention and final logits; this model does not"
            )
        if not getattr(config, "tie_word_embeddings", True):
            raise ModelError("llama.cpp's gemma2 graph uses the embeddings as output layer; this model's are untied")
    elif getattr(config, "attn_logit_softcapping", None):
        raise ModelError("llama.cpp's gemma3 graph has no attention soft-capping; this model has it")


def _write_hparams(writer: gguf.GGUFWriter, config, arch: str, quant: Quant, name: str) -> None:
    _check_supported(config, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(_context_length(config, arch))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    if arch in _PERMUTED:
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads or arch in _NORM_OFFSET:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch in _SWA_PATTERN:
        _write_gemma_hparams(writer, config, arch)
    writer.add_file_type(quant.file_type)
    if quant.qtype not in (_Q.F32, _Q.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_gemma_hparams(writer: gguf.GGUFWriter, config, arch: str) -> None:
    """Soft-capping, the sliding window, which layers slide, and their RoPE base, as llama.cpp's Gemma graphs read."""
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    elif config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    sliding = _sliding_layers(config)
    if any(sliding) and config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
        # The layer pattern as an array: llama.cpp reads it before its default (every 2nd / 6th layer full).
        writer.add_sliding_window_pattern(sliding)
        writer.add_rope_freq_base_swa(_rope_theta(config, "sliding_attention"))
    elif arch == "gemma2":
        raise ModelError("llama.cpp's gemma2 graph always has sliding layers; this model has none")


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's Q/K rows -> llama.cpp's: each head's two rotary halves interleaved (llama.cpp's RoPE pairs neighbours)."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    return (
        weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _qk_heads(hf_name: str, config) -> int | None:
    """Heads to permute by for a llama Q/K weight or bias, None for any other tensor."""
    if ".q_proj." in hf_name or hf_name.endswith(".q_proj"):
        return config.num_attention_heads
    if ".k_proj." in hf_name or hf_name.endswith(".k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _norm_offset(hf_name: str, arch: str) -> float:
    """What llama.cpp's norm weight adds to HF's: 1 for Gemma's RMSNorms (q/k norms included), else 0."""
    return 1.0 if arch in _NORM_OFFSET and hf_name.endswith("norm.weight") else 0.0


def _gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ModelError(f"{hf_name}: this weight has no llama.cpp tensor name")
    return found

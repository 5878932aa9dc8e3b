"""Architectures: hyperparameters, tensor names and llama.cpp's Q/K row order."""

from __future__ import annotations

import gguf
import numpy as np

from ..model import ModelError
from .quants import _Q, Quant

_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
_PERMUTED = {"llama"}  # llama.cpp's llama graph wants Q/K rows in its RoPE order; qwen2 keeps HF's


def _arch(config) -> str:
    arch = getattr(config, "model_type", None)
    if arch not in _ARCHS:
        raise ModelError(f"GGUF export supports the {' and '.join(_ARCHS)} architectures; this model is {arch!r}")
    return arch


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ModelError(f"RoPE scaling {rope_type!r} is not written by chatlora export (only plain RoPE)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ModelError("the model config names no rope_theta")
    return float(theta)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _write_hparams(writer: gguf.GGUFWriter, config, arch: str, quant: Quant, name: str) -> None:
    if getattr(config, "use_sliding_window", False):
        raise ModelError("sliding-window attention is not written by chatlora export")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = _head_dim(config)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(quant.file_type)
    if quant.qtype not in (_Q.F32, _Q.F16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


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


def _gguf_name(name_map: gguf.TensorNameMap, hf_name: str) -> str:
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ModelError(f"{hf_name}: this weight has no llama.cpp tensor name")
    return found

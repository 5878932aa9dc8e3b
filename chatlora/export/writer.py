"""Write a model as one GGUF file (and round a reference model to what the file holds)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import ModelError
from ..files import ensure_space
from ..settings import SamplingConfig
from .arch import (
    _ARCHS,
    _PERMUTED,
    _arch,
    _gguf_arch,
    _gguf_name,
    _norm_offset,
    _permute,
    _qk_heads,
    _unpermute,
    _write_hparams,
)
from .quants import _Q, Quant, _llama_cpp, _quant
from .vocab import _write_tokenizer


def _qtype(shape: tuple[int, ...], gguf_name: str, quant: Quant) -> gguf.GGMLQuantizationType:
    """The GGML type ``quant`` gives a tensor; norms and biases stay f32, as llama.cpp keeps them."""
    if len(shape) == 1:
        return _Q.F32
    qtype = quant.qtype
    if quant.embeddings is not None and gguf_name in ("token_embd.weight", "output.weight"):
        qtype = quant.embeddings
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        qtype = _Q.F16  # rows that do not split into whole blocks: llama.cpp falls back the same way
    return qtype


def _encode(data: np.ndarray, gguf_name: str, quant: Quant) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Tensor data in the GGML type ``quant`` gives it."""
    qtype = _qtype(data.shape, gguf_name, quant)
    return (data.astype(np.float32) if qtype == _Q.F32 else gguf.quants.quantize(data, qtype)), qtype


def _gguf_bytes(model, spec: Quant) -> int:
    """The size of the tensor data a GGUF of ``model`` at ``spec`` holds (metadata adds a few MiB at most)."""
    config = model.config
    name_map = gguf.get_tensor_name_map(_ARCHS[_arch(config)], config.num_hidden_layers)
    total, seen = 0, set()
    for hf_name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied embeddings are written once
            continue
        seen.add(tensor.data_ptr())
        block, size = gguf.GGML_QUANT_SIZES[_qtype(tuple(tensor.shape), _gguf_name(name_map, hf_name), spec)]
        total += tensor.numel() // block * size
    return total


def _gguf_tensors(model, spec: Quant):
    """``(gguf_name, data, qtype)`` for each weight as llama.cpp stores it.

    llama Q/K rows in llama.cpp's order; Gemma's norm weights + 1 (HF's Gemma RMSNorm multiplies by 1 + w).
    """
    config = model.config
    arch = _arch(config)
    name_map = gguf.get_tensor_name_map(_ARCHS[arch], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd as the output layer when output.weight is absent
        gname = _gguf_name(name_map, hf_name)
        data = tensor.detach().to(torch.float32).cpu().numpy() + np.float32(_norm_offset(hf_name, arch))
        heads = _qk_heads(hf_name, config) if arch in _PERMUTED else None
        if heads is not None:
            data = _permute(data, heads)
        yield (gname, *_encode(data, gname, spec))


def _round_like_export_(model, spec: Quant) -> None:
    """Give ``model`` the weights its ``spec`` GGUF holds: each weight encoded and decoded as the file stores it.

    Done on HF's row order, independently of :func:`_permute` (GGML types quantize row by row, so permuting rows
    commutes with them): a file written with wrong Q/K rows does not get a reference with the same mistake. Gemma's
    norms are stored as f32(w + 1), which a reader turns back into f32(w + 1) - 1, not always exactly w.
    """
    config = model.config
    arch = _arch(config)
    name_map = gguf.get_tensor_name_map(_ARCHS[arch], config.num_hidden_layers)
    seen = set()
    with torch.no_grad():
        for hf_name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied embeddings: one tensor under two names, rounded once
                continue
            seen.add(tensor.data_ptr())
            gname = _gguf_name(name_map, hf_name)
            offset = np.float32(_norm_offset(hf_name, arch))
            encoded, qtype = _encode(tensor.detach().to(torch.float32).cpu().numpy() + offset, gname, spec)
            decoded = gguf.quants.dequantize(encoded, qtype).reshape(tuple(tensor.shape)) - offset
            tensor.copy_(torch.from_numpy(np.ascontiguousarray(decoded)))


def _round_like_file_(model, path: Path) -> tuple[str, float]:
    """Give ``model`` the weights the GGUF at ``path`` holds, read back and dequantized (llama.cpp's K-quant mixes,
    which chatlora cannot encode itself to round a reference the way :func:`_round_like_export_` does).

    The Q/K rows are put back in HF order with :func:`_unpermute`, which assumes the file has them in llama.cpp's
    order. Returns the tensor that moved most and by how much (relative RMS): rounding moves a weight by a few percent,
    rows in the wrong order or a wrong tensor by ~100 %, so a file written with HF's Q/K order is caught here even
    though the reference then holds the file's mistake.
    """
    config = model.config
    arch = _arch(config)
    name_map = gguf.get_tensor_name_map(_ARCHS[arch], config.num_hidden_layers)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    worst, seen = ("", 0.0), set()
    with torch.no_grad():
        for hf_name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # tied embeddings: one tensor under two names
                continue
            seen.add(tensor.data_ptr())
            gname = _gguf_name(name_map, hf_name)
            if gname not in tensors:
                return gname, float("inf")
            t = tensors[gname]
            data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(tensor.shape))
            data = data - np.float32(_norm_offset(hf_name, arch))  # Gemma's norms are stored as w + 1
            heads = _qk_heads(hf_name, config) if arch in _PERMUTED else None
            if heads is not None:
                data = _unpermute(data, heads)
            new = torch.from_numpy(np.array(data, dtype=np.float32))  # a writable copy of the file's (read-only) map
            old = tensor.detach().to(torch.float32)
            moved = float((new - old).norm() / old.norm().clamp_min(1e-12))
            if moved > worst[1]:
                worst = (gname, moved)
            tensor.copy_(new)
    return worst


_GGML_LOG_LEVEL_ERROR = 4  # ggml.h of llama-cpp-python 0.3.36's llama.cpp (its own Python logger maps it as DEBUG)


def _llama_quantize(src: Path, dst: Path, spec: Quant) -> None:
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(spec.file_type)  # gguf's LlamaFileType numbers are llama.cpp's llama_ftype
    params.nthread = min(4, os.cpu_count() or 1)
    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def keep_errors(level: int, text: bytes, user_data) -> None:  # a line per tensor otherwise; errors kept
        if level == _GGML_LOG_LEVEL_ERROR:
            errors.append(text.decode("utf-8", errors="replace").strip())

    llama_cpp.llama_log_set(keep_errors, ctypes.c_void_p(0))
    try:
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        from llama_cpp import _logger  # llama-cpp-python's own callback, put back

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if failed:
        raise ModelError(
            f"llama.cpp's quantizer failed to write {spec.name}: {errors[-1] if errors else 'no reason given'}"
        )


def write_gguf(model, tokenizer, path: str | Path, quant: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (a ``*ForCausalLM`` of an architecture in :data:`arch.SUPPORTED`) and ``tokenizer`` as one
    GGUF file llama.cpp loads.

    The chat template, BOS, the end-of-turn token (as EOS and EOT) and chatlora chat's sampling defaults go into the
    metadata. The file appears at ``path`` only once complete. K-quants are written as f32 first, then quantized by
    llama.cpp (the ``gguf`` extra); the f32 file is removed, also on failure.
    """
    spec = _quant(quant)
    path = Path(path)
    config = model.config
    arch = _arch(config)
    # a K-quant file is written beside its f32 source: both are on disk at once
    need = _gguf_bytes(model, spec) + (_gguf_bytes(model, _quant("f32")) if spec.llama_cpp else 0)
    ensure_space(path, need, "the GGUF file")
    tmp = path.with_name(path.name + ".tmp")
    if spec.llama_cpp:
        f32 = path.with_name(path.name + ".f32.tmp")
        try:
            write_gguf(model, tokenizer, f32, "f32", name or path.stem)
            _llama_quantize(f32, tmp, spec)
            os.replace(tmp, path)
        finally:
            f32.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
        return path
    writer = gguf.GGUFWriter(tmp, _gguf_arch(arch))
    _write_hparams(writer, config, arch, spec, name or path.stem)
    _write_tokenizer(writer, tokenizer, config.vocab_size)
    sampling = SamplingConfig()
    writer.add_sampling_temp(sampling.temperature)
    writer.add_sampling_top_p(sampling.top_p)
    writer.add_sampling_top_k(sampling.top_k)
    # no repetition penalty: llama.cpp's means another thing (ollama.NOT_EXPORTED)
    for gname, encoded, qtype in _gguf_tensors(model, spec):
        # f32/f16 arrays carry their type; quantized ones are bytes whose GGML type must be named
        writer.add_tensor(gname, encoded, raw_dtype=None if qtype in (_Q.F32, _Q.F16) else qtype)
    return _finish_gguf(writer, tmp, path)


def _finish_gguf(writer, tmp: Path, path: Path) -> Path:
    """Write header, metadata and tensors to ``tmp``, then move it into place: a GGUF appears whole or not at all,
    and a failed write (a full disk) leaves no partial file behind."""
    try:
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"{path}: cannot write the GGUF file ({e.strerror or e}); no partial file was left") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

"""A PEFT LoRA adapter as a llama.cpp LoRA GGUF."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import ModelError
from ..model import resolve_model
from ..runcard import read_adapter
from .arch import _ARCHS, _PERMUTED, _arch, _gguf_arch, _gguf_name, _permute, _qk_heads
from .quants import LORA_QUANTS
from .writer import _finish_gguf


def _lora_pairs(adapter: Path) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The adapter's config and its ``{base weight name: (A, B)}``, refusing what llama.cpp LoRA cannot express."""
    from safetensors.numpy import load_file

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    problems = []
    if cfg.get("use_dora"):
        problems.append("DoRA")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("per-module rank/alpha patterns")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']}")
    if problems:
        raise ModelError(
            f"{adapter}: a llama.cpp LoRA GGUF cannot hold {', '.join(problems)}; export the merged model"
        )
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise ModelError(f"{adapter}: unexpected tensor {key} in the adapter")
        pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = value.astype(np.float32)
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"} or "embed_tokens" in name or name.startswith("lm_head"):
            raise ModelError(f"{adapter}: {name} is not a plain linear LoRA pair; export the merged model")
        out[name] = (ab["A"], ab["B"])
    return cfg, out


def _lora_alpha(cfg: dict[str, Any]) -> float:
    """``adapter.lora.alpha`` such that llama.cpp's scale alpha / r equals PEFT's (alpha / sqrt(r) with rsLoRA)."""
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return float(alpha * math.sqrt(r)) if cfg.get("use_rslora") else float(alpha)


def write_lora_gguf(adapter: str | Path, path: str | Path, quant: str = "f16") -> Path:
    """Write a PEFT LoRA adapter as a llama.cpp LoRA GGUF (``llama-cli -m BASE.gguf --lora FILE``, Ollama ``ADAPTER``).

    Tensors are ``blk.N.attn_q.weight.lora_a`` (A, r x in) and ``.lora_b`` (B, out x r), B's rows in llama.cpp's
    Q/K order for llama; ``adapter.lora.alpha`` makes llama.cpp's scale alpha / r equal PEFT's.
    """
    if quant not in LORA_QUANTS:
        raise ModelError(f"--lora-only writes {' or '.join(LORA_QUANTS)}, not {quant}")
    adapter, path = Path(adapter), Path(path)
    _, spec = read_adapter(adapter)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model(spec))
    arch = _arch(config)
    cfg, pairs = _lora_pairs(adapter)
    name_map = gguf.get_tensor_name_map(_ARCHS[arch], config.num_hidden_layers)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, _gguf_arch(arch))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(adapter.resolve().name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, _lora_alpha(cfg))
    dtype = np.float16 if quant == "f16" else np.float32
    for hf_name, (a, b) in sorted(pairs.items()):
        gname = _gguf_name(name_map, hf_name)
        heads = _qk_heads(hf_name, config) if arch in _PERMUTED else None
        if heads is not None:
            b = _permute(b, heads)  # W' = W + s B A: permuting W's rows is permuting B's
        writer.add_tensor(gname + ".lora_a", a.astype(dtype))
        writer.add_tensor(gname + ".lora_b", b.astype(dtype))
    return _finish_gguf(writer, tmp, path)

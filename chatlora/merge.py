"""Merge a LoRA adapter into its base model and write a standalone safetensors model + tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .model import ModelError, load_model, load_tokenizer, resolve_model
from .train import RUN_CARD, read_adapter

__all__ = ["merge"]

log = logging.getLogger(__name__)


def merge(adapter: str | Path, output: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """``base + adapter`` -> one model dir that ``from_pretrained`` (and ``chatlora chat --model``) loads alone."""
    from peft import PeftModel

    adapter, output = Path(adapter), Path(output)
    card, spec = read_adapter(adapter)
    if output.resolve() == adapter.resolve():
        raise ModelError("--output must differ from --adapter")
    quantized = card.get("base_model", {}).get("quantize")
    if quantized:
        # merging into 4-bit weights would round the update away; the full-precision base is what others load
        log.warning(
            "this adapter was trained on a %s (QLoRA) base: merging it into the full-precision base weights; the "
            "merged model's replies can differ slightly from the 4-bit model it was trained against",
            quantized,
        )
    base = load_model(resolve_model(spec), dtype)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output, safe_serialization=True)
    load_tokenizer(str(adapter)).save_pretrained(output)
    if card:
        card = {
            **card,
            "merged_from": {
                "adapter": str(adapter.resolve()),
                "base_model": card.get("base_model"),
                "merged_into": "full-precision base" + (f" (trained on a {quantized} base)" if quantized else ""),
            },
        }
        card["base_model"] = {"spec": str(output.resolve()), "resolved": str(output.resolve())}
        (output / RUN_CARD).write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return output

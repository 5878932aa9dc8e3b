"""Merge a LoRA adapter into its base model and write a standalone safetensors model + tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .model import ModelError, load_model, load_tokenizer, resolve_model
from .template import stop_token_ids
from .train import RUN_CARD, read_adapter

__all__ = ["merge", "set_generation_stops"]


def set_generation_stops(model, tokenizer) -> None:
    """Make ``generation_config`` stop where chat generation does: at the end-of-turn token (then EOS).

    A base model's config often names only its pretraining EOS (Yi: 2, while replies end with ``<|im_end|>`` = 7),
    so a merged model would never stop in runtimes that read ``generation_config.json``.
    """
    ids = stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def merge(adapter: str | Path, output: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """``base + adapter`` -> one model dir that ``from_pretrained`` (and ``chatlora chat --model``) loads alone."""
    from peft import PeftModel

    adapter, output = Path(adapter), Path(output)
    card, spec = read_adapter(adapter)
    if output.resolve() == adapter.resolve():
        raise ModelError("--output must differ from --adapter")
    base = load_model(resolve_model(spec), dtype)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    tokenizer = load_tokenizer(str(adapter))
    set_generation_stops(merged, tokenizer)
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    if card:
        card = {**card, "merged_from": {"adapter": str(adapter.resolve()), "base_model": card.get("base_model")}}
        card["base_model"] = {"spec": str(output.resolve()), "resolved": str(output.resolve())}
        (output / RUN_CARD).write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return output

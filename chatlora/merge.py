"""Merge a LoRA adapter into its base model and write a standalone safetensors model + tokenizer."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import ModelError
from .files import ensure_space, publish_dir, staging_dir
from .run import open_run
from .runcard import write_run_card

__all__ = ["merge"]


log = logging.getLogger(__name__)


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ModelError(f"{output}: is a file: --output must be a folder for the merged model")
    if output.is_dir() and not overwrite and any(output.iterdir()):
        raise ModelError(
            f"{output}: folder is not empty: merge would replace files in it; choose a new or empty --output, "
            "or pass --overwrite to write into it (its other files are kept)"
        )


def merge(
    adapter: str | Path, output: str | Path, dtype: torch.dtype = torch.float32, overwrite: bool = False
) -> Path:
    """``base + adapter`` -> one model dir that ``from_pretrained`` (and ``chatlora chat --model``) loads alone.

    The model is written to a staging folder next to ``output`` and moved into place when complete, so a failure
    leaves ``output`` as it was. A non-empty ``output`` is refused unless ``overwrite`` (then the files merge writes
    are replaced one by one, each atomically, and the folder's other files are kept).
    """
    adapter, output = Path(adapter), Path(output)
    run = open_run(adapter)
    card = run.card
    if output.resolve() == adapter.resolve():
        raise ModelError("--output must differ from --adapter")
    quantized = run.quantized
    if quantized:
        # merging into 4-bit weights would round the update away; the full-precision base is what others load
        log.warning(
            "this adapter was trained on a %s (QLoRA) base: merging it into the full-precision base weights; the "
            "merged model's replies can differ slightly from the 4-bit model it was trained against",
            quantized,
        )
    _check_output(output, overwrite)
    staging = staging_dir(output)  # also proves the folder is writable before the model loads
    try:
        merged = run.merged(dtype)
        tokenizer = run.tokenizer
        weights = {t.data_ptr(): t.numel() * t.element_size() for t in merged.state_dict().values()}
        ensure_space(staging, sum(weights.values()), "the merged model")
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
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
            write_run_card(staging, card)
        publish_dir(staging, output)
    except (OSError, SafetensorError) as e:  # a full disk mid-write: safetensors reports it as its own error
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise ModelError(f"{output}: cannot write the merged model ({why}); {output} is unchanged") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output

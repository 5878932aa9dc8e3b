"""Speed paths for training: LM head only where there are labels, and Liger's fused Triton kernels on CUDA.

With a 64k vocabulary the full ``[tokens, vocab]`` logits (upcast to fp32 for the loss) cost gigabytes and a large
matmul per step, while only the assistant tokens carry labels. :func:`label_only_loss` runs the decoder, keeps the
hidden states at label positions and projects only those: same loss, same gradients.
:func:`label_only_loss_wrapped` does the same through the model's own forward (``logits_to_keep``), for a model
wrapped by DDP / FSDP / DeepSpeed, whose hooks fire only there.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..template import IGNORE_INDEX

__all__ = ["apply_liger", "label_only_loss", "label_only_loss_wrapped", "supports_label_only_loss"]

log = logging.getLogger(__name__)


def _base(model):
    model = getattr(model, "module", model)  # DDP
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_label_only_loss(model) -> bool:
    """True for causal LMs whose logits are a plain ``lm_head(decoder(x))`` (no soft-capping or logit scaling)."""
    base = _base(model)
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    try:
        return base.get_decoder() is not None and isinstance(base.get_output_embeddings(), torch.nn.Linear)
    except (AttributeError, NotImplementedError):
        return False


def label_only_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """Causal-LM cross-entropy (labels shifted by one) computing logits only at positions that have a label.

    Normalised by ``num_items_in_batch`` when given (the Trainer's count over the whole accumulation window),
    else by this batch's label count, exactly as transformers' ``ForCausalLMLoss``. ``inputs["label_index"]``
    (flat positions in ``labels[:, 1:]``, from the collator) avoids a device sync; without it they are found here.
    """
    base = _base(model)
    hidden = base.get_decoder()(
        input_ids=inputs["input_ids"],
        attention_mask=inputs.get("attention_mask"),
        position_ids=inputs.get("position_ids"),
        use_cache=False,
    ).last_hidden_state
    target = inputs["labels"][:, 1:].reshape(-1)
    index = inputs.get("label_index")
    if index is None:
        index = (target != IGNORE_INDEX).nonzero().squeeze(1)
    index = index.to(hidden.device)
    kept = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, index)
    logits = base.get_output_embeddings()(kept).float()
    loss = F.cross_entropy(logits, target.index_select(0, index), reduction="sum")
    return _normalised(loss, num_items_in_batch, index.numel())


def label_only_loss_wrapped(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """:func:`label_only_loss` through ``model``'s own forward, so that a DDP / FSDP / DeepSpeed wrapper's hooks fire
    (gradient all-reduce, parameter gathering): the LM head runs only at the columns where some row has a label
    (``logits_to_keep``, which every transformers causal LM takes), the other rows' entries there are ignored."""
    target = inputs["labels"][:, 1:]
    labelled = target != IGNORE_INDEX
    columns = labelled.any(0).nonzero().squeeze(1)
    logits = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs.get("attention_mask"),
        position_ids=inputs.get("position_ids"),
        use_cache=False,
        logits_to_keep=columns,
    ).logits
    kept = target.index_select(1, columns)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), kept.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return _normalised(loss, num_items_in_batch, labelled.sum())


def _normalised(loss: torch.Tensor, num_items_in_batch, count) -> torch.Tensor:
    """``loss`` over the Trainer's count for the accumulation window when given, else over this batch's ``count``."""
    denom = num_items_in_batch if num_items_in_batch is not None else count
    if torch.is_tensor(denom):
        return loss / denom.to(loss.device).clamp(min=1)
    return loss / max(denom, 1)


def apply_liger(model) -> bool:
    """Swap RMSNorm, SwiGLU and RoPE for Liger-Kernel's Triton versions (CUDA only); False when not applied."""
    if not torch.cuda.is_available() or next(model.parameters()).device.type != "cuda":
        log.warning("--liger: Liger kernels need a CUDA GPU; training without them")
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        log.warning("--liger: liger-kernel is not installed (pip install liger-kernel); training without it")
        return False
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )
    return True

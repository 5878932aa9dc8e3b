"""Test helper: a Trainer callback that records what precision a training run really computes in."""

from __future__ import annotations

import torch
from transformers import TrainerCallback


class PrecisionProbe(TrainerCallback):
    """Records, during training, the dtype LoRA's ``lora_A`` matmuls return (bf16/fp16 only under autocast: their
    weights are fp32) and the loss scale of each optimizer step (None without a GradScaler)."""

    def __init__(self):
        self.lora_out_dtypes: set[torch.dtype] = set()
        self.loss_scales: list[float | None] = []
        self.hooks: list = []

    def _record(self, module, inputs, output):
        if torch.is_grad_enabled():  # training steps, not the held-out loss
            self.lora_out_dtypes.add(output.dtype)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for name, module in model.named_modules():
            if name.endswith("lora_A.default"):
                self.hooks.append(module.register_forward_hook(self._record))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        scaler = getattr(optimizer, "scaler", None)
        self.loss_scales.append(None if scaler is None else scaler.get_scale())

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self.hooks:
            hook.remove()

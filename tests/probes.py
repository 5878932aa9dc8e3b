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


def assert_bf16_autocast(result, probe: PrecisionProbe, losses: list[float]) -> None:
    """A bf16 run as planned: frozen base in bf16, LoRA weights (so AdamW's state) fp32, LoRA matmuls autocast to
    bf16 (the label-only loss inside autocast), no loss scaler, and a finite, falling loss."""
    assert result.run_card["hardware"]["precision"] == "bf16" and result.run_card["plan"]["logits_at_labels"]
    params = dict(result.model.named_parameters())
    assert {p.dtype for n, p in params.items() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for n, p in params.items() if "lora_" in n} == {torch.float32}
    assert probe.lora_out_dtypes == {torch.bfloat16}
    assert probe.loss_scales and set(probe.loss_scales) == {None}
    assert all(x == x for x in losses) and losses[-1] < losses[0]

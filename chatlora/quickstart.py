"""The main job: train on the embedded default, then measure base vs tuned on (part of) the held-out split."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .config import TrainConfig
from .inference.infer import ChatModel
from .runcard import system_prompt
from .training.train import TrainResult, train

if TYPE_CHECKING:
    from .eval.results import EvalResult

__all__ = ["eval_held_out", "free_output_dir", "quickstart"]

log = logging.getLogger(__name__)


def eval_held_out(
    result: TrainResult, max_samples: int = 32, max_new_tokens: int | None = None, batch_size: int = 16
) -> EvalResult | None:
    """Cheap eval of the just-trained model (already in memory, in fp32 on a CPU) on its held-out split; report in
    ``output_dir/eval``.

    ``max_new_tokens`` None is `chatlora eval`'s own reply limit (128), so the figures are the ones `eval` gives. It
    leaves room for the replies the model learns: 26 % of the Huanhuan replies are over 64 tokens (SmolLM2's
    tokenizer; 95th percentile 139), and with the earlier limit of 64 a tuned model that wrote one such reply counted
    as "not stopped".
    """
    from .eval import EvalConfig, evaluate

    if not result.run_card or not result.split or not result.split.val:
        return None
    model = result.model
    chat = ChatModel(model, result.tokenizer, system_prompt(result.run_card))
    if next(model.parameters()).device.type == "cpu":
        # fp32 replies on every CPU: bf16 matmul kernels differ between CPUs (AMX, AVX512-BF16), and greedy replies
        # with them; the 135M model costs little more in fp32 (bench/NOTES.md "Issue 30"). A base trained in bf16 is
        # reloaded in fp32 with the adapter just saved: its bf16-rounded weights would make the base's figures
        # depend on which precision the CPU's probe picked.
        if any(p.dtype != torch.float32 for p in model.parameters()):
            chat = ChatModel.load(result.output_dir, device="cpu", dtype="fp32")
        else:
            chat = ChatModel(model.float(), result.tokenizer, system_prompt(result.run_card))
    limit = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    cfg = EvalConfig(result.output_dir, max_samples=max_samples, batch_size=batch_size, **limit)
    return evaluate(cfg, chat)


def free_output_dir(out: Path) -> Path:
    """``out`` if it is free (missing or empty), else the first free ``out-2``, ``out-3``, ..."""
    candidate, n = out, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = out.with_name(f"{out.name}-{n}")
    return candidate


def quickstart(cfg: TrainConfig, eval_samples: int = 32) -> tuple[TrainResult, EvalResult | None]:
    """Train, then evaluate base vs tuned on ``eval_samples`` held-out records (greedy replies, loss, chrF, ...).

    Run again, the demo keeps the earlier run: it trains into the next free ``OUTPUT-N`` folder (unless told to
    resume or overwrite), so ``make quickstart`` always ends in success without touching a finished adapter.
    """
    if not cfg.resume and not cfg.overwrite:
        free = free_output_dir(Path(cfg.output_dir))
        if free != Path(cfg.output_dir):
            log.info("%s already holds a run: this one goes to %s", cfg.output_dir, free)
            cfg = dataclasses.replace(cfg, output_dir=str(free))
    result = train(cfg)
    return result, eval_held_out(result, eval_samples)

"""A sample reply at each checkpoint: what the character says now, written beside the losses while a run trains.

At each save, the model being trained (adapter on) answers one fixed user turn, greedy and short, through the same
chat template as training; the reply goes into ``samples.jsonl`` in the output dir (step, prompt, reply, seconds),
which the studio's live view shows. The prompt is text: it is rendered by :func:`chatlora.template.encode_prompt`,
never parsed for control tokens. Generation leaves training as it found it: eval mode and back, no gradients, and
the CPU and CUDA random states restored, so the losses after a sample equal those of a run without samples.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..data import Record
from ..runcard import SAMPLES, json_safe
from ..template import encode_prompt, stop_token_ids, with_system

__all__ = ["SAMPLES", "SAMPLE_TOKENS", "checkpoint_samples", "generate_sample", "sample_prompt"]

log = logging.getLogger(__name__)

SAMPLE_TOKENS = 48  # ~2-4 s on 2 CPU cores for the embedded model


def sample_prompt(asked: str | None, val: list[Record], train: list[Record]) -> str:
    """The user turn the samples answer: ``asked`` (``--sample-prompt``), else the first held-out record's first user
    turn, else the first training record's."""
    if asked:
        return asked
    for record in (*val[:1], *train[:1]):
        for m in record.messages:
            if m["role"] == "user":
                return m["content"]
    return "Hello!"  # records always hold a user turn; a data format that does not still gets a sample


def generate_sample(
    model,
    tokenizer,
    prompt: str,
    system_prompt: str | None,
    max_new_tokens: int = SAMPLE_TOKENS,
    amp: str | None = None,
) -> tuple[str, float]:
    """A greedy reply of ``model`` to ``prompt`` (its text kept as text), and the seconds it took; the model's mode
    and the random states are as they were afterwards."""
    started = time.perf_counter()
    ids = encode_prompt(with_system([{"role": "user", "content": prompt}], system_prompt), tokenizer)
    device = next(p.device for p in model.parameters())
    was_training = model.training
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16) if amp else nullcontext()
    )
    model.eval()
    try:
        with torch.no_grad(), autocast:
            out = model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                eos_token_id=stop_token_ids(tokenizer),
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    reply = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
    return reply, time.perf_counter() - started


def checkpoint_samples(path: Path, tokenizer, prompt: str, system_prompt: str | None, amp: str | None):
    """A TrainerCallback that appends a sample reply to ``path`` after each checkpoint save (rank 0 only)."""
    from transformers import TrainerCallback

    class CheckpointSamples(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if not state.is_world_process_zero or model is None:
                return
            reply, seconds = generate_sample(model, tokenizer, prompt, system_prompt, amp=amp)
            row = {"step": state.global_step, "time": round(time.time(), 3), "prompt": prompt, "reply": reply}
            row["seconds"] = round(seconds, 2)
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(json_safe(row), ensure_ascii=False) + "\n")
            log.info("sample at step %d (%.1f s): %s", state.global_step, seconds, reply[:120])

    return CheckpointSamples()

"""LoRA training on the HF Trainer: data -> held-out split -> encoded examples -> Trainer -> adapter + run card.

One idea over 600 lines: a training run, read top to bottom as its phases; what it decides before loading (plan),
how it batches (packing), its kernels and its output folder (rundir) live in their own modules.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..character import resolve_character
from ..config import BUILTIN_DATA, ON_HELD_OUT_LOSS, TrainConfig
from ..data import Record, SystemPrompts, load_records, parse_columns
from ..errors import ConfigError, DataError, ModelError
from ..mixing import Mix, mix_in
from ..model import apply_lora, load_model, load_tokenizer, pick_device, pick_precision, resolve_model
from ..packing import PackedDataset, collate
from ..runcard import (
    LOSS_PLOT,
    METRICS,
    RUN_CARD,
    SAMPLES,
    file_sha256,
    json_safe,
    plot_loss_curve,
    read_adapter,
    read_metrics,
    read_run_card,
    write_run_card,
)
from ..template import IGNORE_INDEX, encode_record, end_of_turn
from .kernels import apply_liger, label_only_loss, label_only_loss_wrapped
from .plan import RunPlan, auto_val_count, check_limits, make_plan, read_shape
from .rundir import begin_save, check_output_dir, clear_previous_run, find_resume, mark_complete, rotate
from .samples import checkpoint_samples, sample_prompt

__all__ = [
    "RUN_CARD",
    "PreparedRun",
    "Split",
    "TrainingDiverged",
    "TrainResult",
    "check_launch",
    "compile_layers",
    "drop_short_replies",
    "encode_records",
    "file_sha256",
    "make_trainer",
    "plot_loss_curve",
    "prepare_model",
    "prepare_run",
    "read_adapter",
    "read_run_card",
    "split_records",
    "training_args",
    "train",
]

# RUN_CARD, file_sha256, plot_loss_curve, read_adapter and read_run_card are re-exported from chatlora.runcard,
# their home since inference stopped importing the trainer
log = logging.getLogger(__name__)


@dataclass
class Split:
    train: list[Record]
    val: list[Record]
    dropped_duplicates: int = 0
    rule: str = ""  # how the held-out size was chosen, for the log and the run card
    dropped_short: int = 0  # training records dropped by min_reply_chars


def split_records(records: list[Record], val_size: float | None, seed: int, allow_small_train: bool = False) -> Split:
    """Seeded held-out split. Train copies of a held-out conversation are dropped so nothing evaluated is trained.

    ``val_size``: a count (>= 1), a fraction (< 1), or None for the default (:func:`chatlora.training.plan.auto_val_count`:
    10 %, at most 64, none under 20 records). A split that leaves fewer training records than it holds out is
    refused unless ``allow_small_train``.
    """
    n = len(records)
    if val_size is None:
        n_val, rule = auto_val_count(n), "auto: 10 %, at most 64, none under 20 records"
    elif val_size < 1:
        n_val, rule = int(round(val_size * n)), f"val_size {val_size:g} of the records"
    else:
        n_val, rule = int(val_size), f"val_size {int(val_size)}"
    n_val = min(n_val, max(n - 1, 0))
    if n_val > n - n_val and not allow_small_train:
        raise DataError(
            [
                f"the held-out split ({rule}) takes {n_val} of {n} records and leaves {n - n_val} to train on: "
                f"lower --val-size (unset, the default would hold out {auto_val_count(n)}) or pass "
                "--allow-small-train to train on fewer records than are held out"
            ]
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    val = [r for r in records if r.index in val_idx]
    held = {json.dumps(r.messages, ensure_ascii=False, sort_keys=True) for r in val}
    train, dropped = [], 0
    for r in records:
        if r.index in val_idx:
            continue
        if json.dumps(r.messages, ensure_ascii=False, sort_keys=True) in held:
            dropped += 1
            continue
        train.append(r)
    return Split(train, val, dropped, rule)


def drop_short_replies(split: Split, min_chars: int, data: str) -> Split:
    """Drop the training records whose replies are all shorter than ``min_chars`` characters; held-out records stay.

    Raises:
        DataError: when no training record is left.
    """
    if min_chars <= 0:
        return split
    train = [
        r for r in split.train if any(len(m["content"]) >= min_chars for m in r.messages if m["role"] == "assistant")
    ]
    if not train:
        raise DataError(
            [
                f"{data}: min_reply_chars={min_chars}: no training record has a reply that long "
                f"({len(split.train)} dropped): lower --min-reply-chars or set it to 0"
            ]
        )
    return replace(split, train=train, dropped_short=len(split.train) - len(train))


def encode_records(
    records: list[Record],
    tokenizer,
    system_prompt: str | None,
    max_length: int,
    source="data",
    train_on_prompt: bool = False,
    train_on_user: bool = False,
):
    """Encode records for training. Returns the examples, how many were truncated, and the records dropped because
    not one reply token survived the cut (their prompt alone is longer than ``max_length``). A record the chat
    template refuses raises a DataError naming ``source`` and its line.

    ``train_on_prompt`` labels every token of a kept conversation (system prompt, user turns, template), not only
    the replies; ``train_on_user`` the user turns' text too. The records kept are the same either way.
    """
    examples, truncated, empty = [], 0, []
    for r in records:
        enc = encode_record(r, tokenizer, system_prompt, max_length, train_on_prompt, train_on_user, source)
        truncated += enc.truncated
        if all(label == IGNORE_INDEX for label in enc.labels):
            empty.append(r)
            continue
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return examples, truncated, empty


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def _versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    return {
        "chatlora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def peak_memory(device: torch.device) -> dict[str, float]:
    """The training process's peak memory so far, in GiB: on a GPU what torch allocated and reserved at most
    (``max_memory_allocated``, ``max_memory_reserved``), on the CPU the process's peak resident set (``ru_maxrss``)."""
    if device.type == "cuda":
        return {
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3),
        }
    import resource

    return {"peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3)}


def _trainer_callback(metrics_path: Path, plan: RunPlan | None = None):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class RunLogger(TrainerCallback):
        """One progress bar (loss, lr, recent tokens/s, ETA) and one metrics.jsonl line per log, on rank 0 only.

        A ``{"event": "begin"}`` line marks each (re)start, so the run card's whole-run time and tokens/s add up
        the segments of a resumed run; it carries the plan's estimates (peak memory, seconds per step) that a live
        view compares the run with. Each loss line carries the process's peak memory so far (:func:`peak_memory`).
        fp16 steps the loss scaler skipped (inf/NaN gradients) are counted.
        """

        bar = None
        skipped_steps = 0

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step")
            self.last = (time.time(), state.num_input_tokens_seen)
            self._write(
                {
                    "event": "begin",
                    "step": state.global_step,
                    "max_steps": state.max_steps,  # what a live view (the studio) shows progress against
                    "time": round(self.last[0], 3),
                    "tokens_seen": state.num_input_tokens_seen,
                    "estimated_peak_gib": round(plan.estimate.total, 2) if plan and plan.estimate else None,
                    "estimated_s_per_step": float(f"{plan.time.seconds_per_step:.3g}") if plan and plan.time else None,
                }
            )

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if getattr(optimizer, "step_was_skipped", False):
                self.skipped_steps += 1

        def on_step_end(self, args, state, control, **kwargs):
            # the last step always logs (every rank: the log sums the ranks' tokens), so a run shorter than
            # logging_steps still has a train loss, a curve and a tokens/s
            if state.global_step >= state.max_steps:
                control.should_log = True
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            now = time.time()
            row = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "time": round(now, 3),
                "tokens_seen": state.num_input_tokens_seen,
            }
            row.update({k: v for k, v in logs.items() if k not in ("epoch", "step")})
            if "loss" in logs:
                t0, tok0 = self.last
                # the rate since the previous log line: what the run does now, not an average over its warm-up
                row["tokens_per_second_recent"] = round((state.num_input_tokens_seen - tok0) / max(now - t0, 1e-9), 1)
                row["skipped_steps"] = self.skipped_steps
                row.update(peak_memory(args.device))
                self.last = (now, state.num_input_tokens_seen)
            self._write(row)
            if self.bar is not None:
                post = {}
                if "loss" in logs:
                    post = {"loss": f"{logs['loss']:.3f}", "lr": f"{logs.get('learning_rate', 0):.1e}"}
                    post["recent tok/s"] = f"{row['tokens_per_second_recent']:.0f}"
                if "eval_loss" in logs:
                    post["eval"] = f"{logs['eval_loss']:.3f}"
                if post:
                    self.bar.set_postfix(post, refresh=True)

        def _write(self, row: dict) -> None:
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return RunLogger()


def whole_run(metrics_path: Path, end_time: float) -> dict[str, Any]:
    """Training time, mean loss and the last interval's tokens/s over every segment of a run (resumes included),
    from ``metrics.jsonl``."""
    rows = read_metrics(metrics_path)
    runtime, seg_start, seg_last = 0.0, None, None
    for r in rows:
        if r.get("event") == "begin":
            if seg_start is not None:
                runtime += seg_last - seg_start
            seg_start = seg_last = r["time"]
        elif seg_start is not None:
            seg_last = r["time"]
    if seg_start is not None:
        runtime += end_time - seg_start
    losses = [r for r in rows if "loss" in r]
    weighted, steps, prev = 0.0, 0, 0
    for r in losses:  # each line is the mean over the steps since the previous one
        weighted += r["loss"] * (r["step"] - prev)
        steps += r["step"] - prev
        prev = r["step"]
    return {
        "train_runtime_s": round(runtime, 1),
        "train_loss_mean": weighted / steps if steps else None,
        "tokens_per_second_recent": losses[-1].get("tokens_per_second_recent") if losses else None,
    }


def training_args(cfg: TrainConfig, precision, device, has_eval: bool, plan: RunPlan, args_class=None, **extra):
    """The Trainer's arguments for ``cfg`` as planned; ``args_class`` (a TrainingArguments subclass such as TRL's
    DPOConfig) and ``extra`` (its own fields) for other trainers."""
    from transformers import TrainingArguments

    kw: dict[str, Any] = dict(
        output_dir=cfg.output_dir,
        # a packed dataset item is already a whole micro-batch
        per_device_train_batch_size=1 if plan.packing else cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=plan.batches.micro_batches_per_step,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        neftune_noise_alpha=cfg.neftune_noise_alpha or None,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        seed=cfg.seed,
        data_seed=cfg.order_seed,
        bf16=precision.amp == "bf16",
        fp16=precision.amp == "fp16",
        gradient_checkpointing=cfg.gradient_checkpointing or plan.memory_mode,
        # non-reentrant: works with frozen embeddings (no enable_input_require_grads hack) and with packing
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=None,  # rotated by ChatloraTrainer, among complete checkpoints only
        eval_strategy="steps" if has_eval and cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        report_to=report_targets(cfg.report_to),  # TensorBoard writes to OUTPUT_DIR/runs/
        remove_unused_columns=False,
        # packed batches are counted on the CPU by ChatloraTrainer (the stock count syncs the GPU)
        include_num_input_tokens_seen="no" if plan.packing else "non_padding",
        # the NaN filter reads every micro-batch's loss on the host (a GPU sync per micro-batch); a non-finite
        # loss stops the run at the next log line instead (ChatloraTrainer.log)
        logging_nan_inf_filter=False,
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        ddp_find_unused_parameters=False,  # LoRA uses every trainable parameter in every step
        # batches reach the GPU from pinned memory without a sync, so the CPU queues the next step while the GPU
        # still runs this one
        accelerator_config={"non_blocking": device.type == "cuda"},
        dataloader_pin_memory=device.type == "cuda",
        disable_tqdm=True,
        log_level="warning",
    )
    if cfg.fsdp:
        kw["fsdp"] = "full_shard auto_wrap"  # accelerate's FSDP plugin wraps each of model._no_split_modules
    if cfg.deepspeed:
        kw["deepspeed"] = cfg.deepspeed
    fields = TrainingArguments.__dataclass_fields__
    if cfg.group_by_length and not plan.packing:  # packed micro-batches are already length-balanced
        if "train_sampling_strategy" in fields:
            kw["train_sampling_strategy"] = "group_by_length"
        else:
            kw["group_by_length"] = True
    if "activation_checkpointing" in fields:  # renamed in transformers 5.2x
        kw["activation_checkpointing"] = kw.pop("gradient_checkpointing")
        if "activation_checkpointing_kwargs" in fields:
            kw["activation_checkpointing_kwargs"] = kw.pop("gradient_checkpointing_kwargs")
    if "warmup_ratio" in fields and "warmup_steps" in fields and fields["warmup_steps"].type in (int, "int"):
        kw["warmup_ratio"] = kw.pop("warmup_steps")
    args = (args_class or TrainingArguments)(**kw, **extra)
    if args.n_gpu > 1:
        # One process sees several GPUs: the Trainer would wrap the model in nn.DataParallel, which multiplies the
        # batch by the GPU count, replicates the model every step and loads GPU 0 most. Train on one; data
        # parallelism is torchrun / accelerate launch (one process per GPU). Transformers does the same for
        # model-parallel models.
        log.warning(
            "%d GPUs are visible to this single process: training on %s only. To train on all of them, launch one "
            "process per GPU: torchrun --nproc-per-node %d -m chatlora.cli train ... (README: Several GPUs)",
            args.n_gpu,
            args.device,
            args.n_gpu,
        )
        args._n_gpu = 1
    return args


class TrainingDiverged(ModelError):
    """The loss became NaN or infinite: the run stops instead of writing a broken adapter."""


@dataclass
class TrainResult:
    output_dir: Path
    run_card: dict[str, Any]
    metrics_path: Path
    plot_path: Path | None
    model: Any = field(repr=False, default=None)
    tokenizer: Any = field(repr=False, default=None)
    split: Split | None = field(repr=False, default=None)


def _trim_metrics(metrics_path: Path, checkpoint: str | None) -> None:
    """On resume, drop log lines (metrics, samples) written after the checkpoint so the curve continues without
    duplicates; a fresh run starts without them."""
    if not metrics_path.exists():
        return
    if checkpoint is None:
        metrics_path.unlink()
        return
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
    kept = [row for row in read_metrics(metrics_path) if row.get("step", 0) <= step]  # a torn last line goes too
    metrics_path.write_text("".join(json.dumps(row, allow_nan=False) + "\n" for row in kept), encoding="utf-8")


def _collator(pad_id: int, label_index: bool, strategy: str = "pack"):
    """The Trainer's collator: PackedDataset micro-batches laid out by the packing strategy, plain examples (training
    without packing, the held-out loss) padded."""

    def collate_any(batch: list) -> dict[str, Any]:
        if batch and isinstance(batch[0], list):  # PackedDataset items: lists of rows
            return collate([row for item in batch for row in item], pad_id, strategy, label_index=label_index)
        return collate(batch, pad_id)

    return collate_any


class SafeRunMixin:
    """What every chatlora trainer adds to a Trainer (HF's or TRL's, listed after it): checkpoints marked complete
    only once every file is on disk and rotated among complete ones (``keep_checkpoints``), and a run whose loss
    becomes NaN or infinite stopped with :class:`TrainingDiverged` instead of writing a broken adapter."""

    keep_checkpoints = 2

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        # the Trainer writes checkpoint-N file by file: flag it as being saved, mark it complete once every file
        # is on disk, and only then rotate (rotation of incomplete folders is ours, not the Trainer's)
        run_dir = Path(self._get_output_dir(trial=trial))
        ckpt = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            begin_save(ckpt)
        super()._save_checkpoint(model, trial)
        if self.args.world_size > 1:
            self.accelerator.wait_for_everyone()  # FSDP ranks write their own shards
        if self.args.should_save:
            mark_complete(ckpt, self.state.global_step)
            rotate(run_dir, self.keep_checkpoints)

    def log(self, logs, *args, **kwargs):
        for key in ("loss", "eval_loss"):
            if key in logs and not math.isfinite(logs[key]):
                raise TrainingDiverged(
                    f"the {'held-out' if key == 'eval_loss' else 'training'} loss became {logs[key]} by step "
                    f"{self.state.global_step}: training stopped (lower --lr, or check the data); "
                    "earlier checkpoints are kept"
                )
        super().log(logs, *args, **kwargs)


def _trainer_class(label_only: bool, keep_checkpoints: int):
    from transformers import Trainer

    class ChatloraTrainer(SafeRunMixin, Trainer):
        """Counts packed batches' real tokens on the CPU (the stock count syncs the GPU every micro-step) and,
        with ``label_only``, takes the loss from :func:`chatlora.training.kernels.label_only_loss` (one process) or
        :func:`chatlora.training.kernels.label_only_loss_wrapped` (several)."""

        unsynced_tokens = 0  # this rank's packed tokens since the last log (several processes)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            single = self.args.world_size == 1
            real = inputs.pop("num_real_tokens", None)
            if real is not None and model.training:
                if single:
                    self.state.num_input_tokens_seen += real
                else:
                    self.unsynced_tokens += real
            if not label_only or return_outputs or "labels" not in inputs:
                inputs.pop("label_index", None)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if single:
                # label_only_loss calls the decoder itself, bypassing the bf16/fp16 autocast that accelerate wraps
                # around model.forward; without it PEFT runs every LoRA matmul in fp32 (measured: 26 % of GPU time)
                with self.accelerator.autocast():
                    loss = label_only_loss(model, inputs, num_items_in_batch)
            else:  # through the DDP/FSDP wrapper's forward, whose hooks all-reduce and gather
                inputs.pop("label_index", None)
                loss = label_only_loss_wrapped(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # mirrors Trainer.compute_loss's DDP rescale
            return loss

        def log(self, logs, *args, **kwargs):
            # every rank logs at the same steps, so summing the ranks' token counts here costs one small
            # all-reduce per log line instead of a sync per micro-step
            if self.args.world_size > 1 and self.args.include_num_input_tokens_seen == "no":
                mine = torch.tensor([self.unsynced_tokens], dtype=torch.long, device=self.accelerator.device)
                self.state.num_input_tokens_seen += int(self.accelerator.reduce(mine, reduction="sum").item())
                self.unsynced_tokens = 0
            super().log(logs, *args, **kwargs)

    ChatloraTrainer.keep_checkpoints = keep_checkpoints
    return ChatloraTrainer


def prepare_model(cfg: TrainConfig, model_path: str, device: torch.device, precision, plan: RunPlan):
    """Base model stored in the run's dtype (or 4-bit), Liger kernels and LoRA applied, layers compiled, as planned.

    LoRA weights (and so AdamW's state) are fp32 whatever the base's dtype; fp16 runs scale the loss.
    """
    if cfg.random_init and device.type == "cuda" and not cfg.quantize:
        with torch.device(device):  # random init on the GPU: seconds instead of minutes for a 6B model
            model = load_model(model_path, precision.weights, random_init=True)
    else:
        model = load_model(
            model_path,
            precision.weights,
            device if cfg.quantize else None,
            random_init=cfg.random_init,
            quantize=cfg.quantize,
        )
    model.config.use_cache = False  # a KV cache in training also hides packed-sequence boundaries from the mask
    if plan.liger:
        if not cfg.quantize:  # a 4-bit model is already placed (and refuses .to)
            model.to(device)
        if not apply_liger(model):
            plan.liger = False
    if cfg.gradient_checkpointing or plan.memory_mode:
        model.enable_input_require_grads()
    if cfg.from_adapter:
        from peft import PeftModel

        # the adapter goes on training: its own rank, targets and weights, saved like a fresh one
        model = PeftModel.from_pretrained(model, cfg.from_adapter, is_trainable=True)
    else:
        model = apply_lora(
            model,
            cfg.lora_r,
            cfg.lora_alpha,
            cfg.lora_dropout,
            cfg.lora_targets,
            dora=cfg.dora,
            rslora=cfg.rslora,
            layers=cfg.lora_layers,
        )
    if plan.compile:
        compile_layers(model)
    return model


def compile_layers(model) -> int:
    """``torch.compile`` every decoder layer in place; identical layers share one compiled graph. Returns the count."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()
    return len(layers)


def make_trainer(
    cfg: TrainConfig, model, tokenizer, args, train_ex: list[dict], val_ex: list[dict], plan: RunPlan, callbacks=()
):
    """The HF Trainer for encoded examples, with the planned packing and label-only loss."""
    label_only = plan.logits_at_labels
    if plan.packing:
        train_set: torch.utils.data.Dataset = PackedDataset(
            train_ex,
            cfg.max_length,
            tokens_per_batch=cfg.tokens_per_batch if plan.batches.mode == "tokens" else None,
            seed=cfg.order_seed,
            strategy=cfg.packing_strategy,
            n_batches=plan.batches.micro_batches_per_epoch if plan.batches.mode == "steps" else None,
        )
    else:
        train_set = _ListDataset(train_ex)
    return _trainer_class(label_only, cfg.save_total_limit)(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=_ListDataset(val_ex) if val_ex else None,
        data_collator=_collator(tokenizer.pad_token_id, label_only, cfg.packing_strategy),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


@dataclass
class PreparedRun:
    """Everything decided before any weights load: data, split, tokenizer, encodings and the plan."""

    cfg: TrainConfig
    records: list[Record]
    split: Split
    device: torch.device
    precision: Any
    model_path: str
    tokenizer: Any
    train_ex: list[dict]
    val_ex: list[dict]
    truncated: dict[str, int]
    dropped: dict[str, int]
    plan: RunPlan
    system: SystemPrompts
    mix: Mix | None = None

    def lines(self) -> list[str]:
        s = self.split
        mix = [self.mix.line()] if self.mix else []
        return [
            f"data: {self.cfg.data}: {len(self.records)} records -> {len(s.train)} train, {len(s.val)} held out "
            f"({s.rule})"
            + (f", {s.dropped_duplicates} training copies of held-out records dropped" if s.dropped_duplicates else "")
            + (
                f", {s.dropped_short} training records with replies under {self.cfg.min_reply_chars} characters "
                "dropped"
                if s.dropped_short
                else ""
            ),
            *mix,
            self.system.line(),
            *self.plan.lines(),
        ]


def _world() -> tuple[int, int]:
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def _deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def report_targets(report_to: str) -> list[str]:
    """``--report-to`` as the Trainer's list (``none``: no tracker)."""
    return [t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"] or ["none"]


def _check_trackers(report_to: str) -> None:
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    for name in report_targets(report_to):
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise ConfigError(
                f"`--report-to` {name}: unknown tracker, expected none or {', '.join(INTEGRATION_TO_CALLBACK)}"
            )
        if name not in get_available_reporting_integrations():
            raise ConfigError(f"`--report-to` {name}: its package is not installed (pip install {name})")


def check_launch(cfg: TrainConfig, world_size: int) -> None:
    """Refuse ``--deepspeed`` without deepspeed installed and ``--fsdp`` in a single process, before anything loads;
    likewise an experiment tracker (``--report-to``) that is unknown or not installed, and a ``--from-adapter``
    folder that holds no adapter.

    The dry run and the run both call this, so they agree: neither plans or starts a run that cannot train.
    """
    if cfg.deepspeed and not _deepspeed_installed():
        raise ConfigError(
            f"`--deepspeed` ({cfg.deepspeed}) needs the deepspeed package, which is not installed: "
            "pip install deepspeed (or drop --deepspeed)"
        )
    if cfg.report_to != "none":
        _check_trackers(cfg.report_to)
    if cfg.from_adapter and not (Path(cfg.from_adapter) / "adapter_config.json").is_file():
        raise ConfigError(
            f"`--from-adapter` ({cfg.from_adapter}) must be a chatlora output dir holding an adapter "
            "(adapter_config.json)"
        )
    if cfg.fsdp and world_size <= 1:
        raise ConfigError(
            "`--fsdp` shards the model across several processes, but this is a single process (WORLD_SIZE "
            f"{os.environ.get('WORLD_SIZE', 'unset')}): launch one process per GPU with "
            "torchrun --nproc_per_node N -m chatlora train ... (N: the GPUs to shard over), or drop --fsdp"
        )


def placement(cfg: TrainConfig) -> tuple[int, torch.device, Any, str, Any]:
    """World size, device, precision, the resolved model and its shape (read on the meta device: no weights),
    checked against the model's limits: where and on what a run trains."""
    world_size, local_rank = _world()
    device = pick_device(cfg.device)
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device("cuda", local_rank)
    precision = pick_precision(device, cfg.dtype)
    model_path = resolve_model(cfg.model)
    shape = read_shape(model_path, cfg)
    check_limits(cfg, shape, precision, world_size if cfg.fsdp else 1)
    return world_size, device, precision, model_path, shape


def prepare_run(cfg: TrainConfig) -> PreparedRun:
    """Read and split the data, encode it, and plan the run (speed-ups, micro-batches, memory) without weights."""
    check_launch(cfg, _world()[0])  # a run that cannot start says so before reading anything
    # Data first: invalid data must stop us before any model is loaded.
    records = load_records(cfg.data, cfg.format, parse_columns(cfg.columns))
    split = split_records(records, cfg.val_size, cfg.split_seed, cfg.allow_small_train)
    split = drop_short_replies(split, cfg.min_reply_chars, cfg.data)
    if cfg.lr_scheduler in ON_HELD_OUT_LOSS and not split.val:  # TrainingArguments refuses it without an eval
        raise ConfigError(
            f"`--lr-scheduler` ({cfg.lr_scheduler}) steps on the held-out loss, but no record is held out "
            f"({split.rule}): set --val-size or pick another scheduler"
        )
    world_size, device, precision, model_path, shape = placement(cfg)
    tokenizer = load_tokenizer(model_path)
    system = system_prompts(cfg, records)
    system_prompt = system.added
    train_ex, train_trunc, train_empty = encode_records(
        split.train, tokenizer, system_prompt, cfg.max_length, cfg.data, cfg.train_on_prompt, cfg.train_on_user
    )
    # held-out loss counts the replies only, whatever is trained, so it compares across recipes and with `eval`
    val_ex, val_trunc, val_empty = encode_records(split.val, tokenizer, system_prompt, cfg.max_length, cfg.data)
    if train_trunc or val_trunc:
        log.warning(
            "%d training and %d held-out conversations were longer than max_length=%d and were cut",
            train_trunc,
            val_trunc,
            cfg.max_length,
        )
    if train_empty or val_empty:
        first = (train_empty or val_empty)[0]
        log.warning(
            "%d training and %d held-out conversations were dropped: not one reply token fits in max_length=%d "
            "(first: %s:%d)",
            len(train_empty),
            len(val_empty),
            cfg.max_length,
            cfg.data,
            first.line,
        )
    if not train_ex:
        raise DataError(
            [
                f"{cfg.data}: no training conversation has a reply token within max_length={cfg.max_length} tokens "
                "(system prompt + first user turn are longer): raise --max-length or shorten the system prompt"
            ]
        )
    mix = None
    if cfg.datasets:  # several sources: each encoded as the first, then weighted
        train_ex, mix = mix_in(cfg, len(records), train_ex, partial(_encode_source, cfg, tokenizer, system_prompt))
    plan = make_plan(cfg, device, precision, shape, train_ex, world_size)
    return PreparedRun(
        cfg=cfg,
        records=records,
        split=split,
        device=device,
        precision=precision,
        model_path=model_path,
        tokenizer=tokenizer,
        train_ex=train_ex,
        val_ex=val_ex,
        truncated={"train": train_trunc, "val": val_trunc, "max_length": cfg.max_length},
        dropped={"train": len(train_empty), "val": len(val_empty)},
        plan=plan,
        system=system,
        mix=mix,
    )


def _encode_source(cfg: TrainConfig, tokenizer, system_prompt: str | None, records: list[Record], path: str):
    """A mixed-in source's records encoded as the run's training records (its records kept whole: no split)."""
    examples, truncated, empty = encode_records(
        records, tokenizer, system_prompt, cfg.max_length, path, cfg.train_on_prompt, cfg.train_on_user
    )
    if truncated or empty:
        log.warning(
            "%s: %d conversations cut at max_length=%d, %d dropped", path, truncated, cfg.max_length, len(empty)
        )
    return examples


def system_prompts(cfg: TrainConfig, records: list[Record]) -> SystemPrompts:
    """The system prompts ``records`` train with: their own, and ``cfg``'s (or the built-in data's) for the rest."""
    if cfg.character is not None:
        source = "the character card"
    elif cfg.system_prompt is None:
        source = f"chatlora's built-in prompt for {BUILTIN_DATA}"
    else:
        source = "--system-prompt"
    return SystemPrompts.of(records, cfg.added_system_prompt, source)


def train(cfg: TrainConfig, callbacks=()) -> TrainResult:
    """Run one LoRA training job end to end and write adapter, checkpoints, metrics, loss plot and run card.

    Phases: encode the splits and plan (:func:`prepare_run`), claim the output dir, build the trainer, train, write
    the adapter and run card. ``callbacks``: extra ``transformers.TrainerCallback`` objects (e.g. a benchmark's
    timer).
    """
    run = prepare_run(cfg)
    built, ended, eval_loss = fit(cfg, run, _build_trainer, callbacks)
    return _write_outputs(cfg, run, built, ended, eval_loss)


def fit(cfg: TrainConfig, run: PreparedRun, build, callbacks=()) -> tuple[_BuiltTrainer, float, float | None]:
    """Log the plan, claim the output dir, build the trainer (``build(cfg, run, checkpoint, callbacks)``) and train;
    returns it, when training ended and the final held-out loss."""
    for line in run.lines():
        log.info("%s", line)
    checkpoint = _claim_output_dir(cfg, run)
    built = build(cfg, run, checkpoint, callbacks)
    built.trainer.train(resume_from_checkpoint=checkpoint)
    ended = time.time()
    return built, ended, _final_eval_loss(built.trainer, run)


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _claim_output_dir(cfg: TrainConfig, run: PreparedRun) -> str | None:
    """Stop before any weights load if the run cannot fit or would clobber another; return the checkpoint to resume."""
    if not run.plan.fits and run.device.type == "cuda":
        raise ModelError(
            f"this run would not fit on {run.device}: estimated {run.plan.estimate.total:.1f} GiB against "
            f"{run.plan.available_gib:.1f} GiB available. "
            + ("Would fit: " + "; ".join(run.plan.alternatives) if run.plan.alternatives else "")
        )
    out = Path(cfg.output_dir)
    if _rank0():
        check_output_dir(out, resume=bool(cfg.resume), overwrite=cfg.overwrite)
    return find_resume(out, cfg.resume)


@dataclass
class _BuiltTrainer:
    trainer: Any
    args: Any
    logger: Any  # the RunLogger callback: progress bar, metrics.jsonl, skipped fp16 steps
    metrics_path: Path
    params: tuple[int, int]  # trainable, total


def model_and_output(cfg: TrainConfig, run: PreparedRun, checkpoint: str | None) -> tuple[Any, tuple[int, int], Path]:
    """The seeded model with LoRA as planned, its (trainable, total) parameters, and the output dir made ready (the
    previous run cleared first with --overwrite); returns the path of its metrics.jsonl."""
    from transformers import set_seed

    out = Path(cfg.output_dir)
    set_seed(cfg.seed)
    model = prepare_model(cfg, run.model_path, run.device, run.precision, run.plan)
    params = model.get_nb_trainable_parameters()
    if _rank0() and cfg.overwrite and not checkpoint:
        clear_previous_run(out)
    out.mkdir(parents=True, exist_ok=True)
    return model, params, out / METRICS


def run_logger(args, metrics_path: Path, checkpoint: str | None, plan: RunPlan | None = None):
    """The RunLogger callback, over a fresh (or, resuming, trimmed) metrics.jsonl and samples.jsonl."""
    if args.process_index == 0:
        _trim_metrics(metrics_path, checkpoint)
        _trim_metrics(metrics_path.with_name(SAMPLES), checkpoint)
    return _trainer_callback(metrics_path, plan)


def sample_callbacks(cfg: TrainConfig, run: PreparedRun, out: Path, world_size: int) -> list[Any]:
    """The checkpoint-samples callback when ``cfg.samples`` asks for it (one process only: rank 0 generating alone
    would leave sharded or synchronised ranks waiting)."""
    if not cfg.samples:
        return []
    if world_size > 1:
        log.warning("--samples: skipped with several processes (one process generates alone)")
        return []
    prompt = sample_prompt(cfg.sample_prompt, run.split.val, run.split.train)
    return [checkpoint_samples(out / SAMPLES, run.tokenizer, prompt, run.system.single, run.precision.amp)]


def _build_trainer(cfg: TrainConfig, run: PreparedRun, checkpoint: str | None, callbacks) -> _BuiltTrainer:
    """Model with LoRA as planned, a fresh (or, resuming, trimmed) metrics.jsonl, and the Trainer around both."""
    from transformers.trainer_callback import PrinterCallback

    model, params, metrics_path = model_and_output(cfg, run, checkpoint)
    args = training_args(cfg, run.precision, run.device, bool(run.val_ex), run.plan)
    logger = run_logger(args, metrics_path, checkpoint, run.plan)
    samples = sample_callbacks(cfg, run, metrics_path.parent, args.world_size)
    trainer = make_trainer(
        cfg, model, run.tokenizer, args, run.train_ex, run.val_ex, run.plan, [logger, *samples, *callbacks]
    )
    trainer.remove_callback(PrinterCallback)  # our RunLogger reports instead
    return _BuiltTrainer(trainer, args, logger, metrics_path, params)


def _final_eval_loss(trainer, run: PreparedRun) -> float | None:
    """The held-out loss at the last step: the one just logged, else measured now (None without a held-out split, or
    with ``eval_steps`` -1)."""
    if not run.val_ex or run.cfg.eval_steps < 0:
        return None
    last = trainer.state.log_history[-2:] if trainer.state.log_history else []
    done = [h["eval_loss"] for h in last if "eval_loss" in h and h.get("step") == trainer.state.global_step]
    return done[0] if done else trainer.evaluate()["eval_loss"]


def _write_outputs(
    cfg: TrainConfig,
    run: PreparedRun,
    built: _BuiltTrainer,
    ended: float,
    eval_loss: float | None,
    card_sections: dict[str, Any] | None = None,
) -> TrainResult:
    """The adapter and tokenizer (every rank takes part), then, on rank 0, the loss plot and the run card (with
    ``card_sections`` added: a preference run's method and pairs)."""
    out = Path(cfg.output_dir)
    trainer = built.trainer
    trainer.save_model(str(out))  # PEFT adapter + tokenizer (with its chat template)
    plot_path = None
    card: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        plot_path = plot_loss_curve(built.metrics_path, out / LOSS_PLOT)
        card = {**_run_card(cfg, run, built, ended, eval_loss), **(card_sections or {})}
        write_run_card(out, card)
    return TrainResult(out, card, built.metrics_path, plot_path, trainer.model, run.tokenizer, run.split)


def _run_card(cfg, run: PreparedRun, built: _BuiltTrainer, ended: float, eval_loss: float | None) -> dict[str, Any]:
    trainer, args, logger, params = built.trainer, built.args, built.logger, built.params
    train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    eot_token, _ = end_of_turn(run.tokenizer)
    whole = whole_run(built.metrics_path, ended)
    tokens = trainer.state.num_input_tokens_seen
    peak = round(torch.cuda.max_memory_allocated(run.device) / 2**30, 2) if run.device.type == "cuda" else None
    return {
        "chatlora_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg.to_dict(),
        "base_model": {
            "spec": cfg.model,
            "resolved": run.model_path,
            "random_init": cfg.random_init,
            "quantize": cfg.quantize,
        },
        "dataset": {
            "path": str(Path(cfg.data).resolve()),
            "sha256": file_sha256(cfg.data),
            "records": len(run.records),
            "train_records": len(run.split.train),
            "val_records": len(run.split.val),
            "split_seed": cfg.split_seed,
            "val_size": cfg.val_size,
            "val_rule": run.split.rule,
            "val_indices": [r.index for r in run.split.val],
            "dropped_duplicates_of_val": run.split.dropped_duplicates,
            "dropped_short_replies": run.split.dropped_short,
            "truncated": run.truncated,
            "dropped_no_reply_tokens": run.dropped,
            "mix": run.mix.to_dict() if getattr(run, "mix", None) else None,
        },
        "template": {
            "system_prompt": run.system.single,  # what chat, serve and export add to a prompt without one
            "system_prompts": run.system.to_dict(),
            "end_of_turn": eot_token,
            "character": resolve_character(cfg.character).record() if cfg.character is not None else None,
        },
        "plan": run.plan.to_dict(),  # what applied, not what was asked
        "hardware": {
            "device": str(run.device),
            "precision": run.precision.name,
            "base_dtype": str(run.precision.weights).replace("torch.", ""),
            "world_size": args.world_size,
            "distributed": _distributed(cfg, args),
            "peak_gpu_memory_gib": peak,
            "estimated_peak_gib": round(run.plan.estimate.total, 2) if run.plan.estimate else None,
        },
        "parameters": {"trainable": params[0], "total": params[1]},
        "versions": _versions(),
        "results": {
            "global_step": trainer.state.global_step,
            "train_loss_final": train_losses[-1] if train_losses else None,
            "train_loss_mean": whole["train_loss_mean"],
            "eval_loss": eval_loss,
            "eval_perplexity": math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None,
            "tokens_seen": tokens,
            "train_runtime_s": whole["train_runtime_s"],
            # whole run (resumes included, warm-up and compile included) vs the last logged interval
            "tokens_per_second_average": round(tokens / max(whole["train_runtime_s"], 1e-9), 1),
            "tokens_per_second_recent": whole["tokens_per_second_recent"],
            "fp16_skipped_steps": logger.skipped_steps if run.precision.amp == "fp16" else None,
        },
    }


def _distributed(cfg: TrainConfig, args) -> str | None:
    if cfg.fsdp:
        return "fsdp"
    if cfg.deepspeed:
        return "deepspeed"
    return "ddp" if args.world_size > 1 else None

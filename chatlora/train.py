"""LoRA training on the HF Trainer: data -> held-out split -> encoded examples -> Trainer -> adapter + run card."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import TrainConfig
from .data import DataError, Record, load_records, parse_columns
from .kernels import apply_liger, label_only_loss, supports_label_only_loss
from .model import ModelError, apply_lora, load_model, load_tokenizer, pick_device, pick_precision, resolve_model
from .packing import PackedDataset, collate_buckets, collate_packed
from .template import IGNORE_INDEX, encode_conversation, end_of_turn, with_system

__all__ = [
    "RUN_CARD",
    "Split",
    "TrainResult",
    "collate",
    "compile_layers",
    "encode_records",
    "file_sha256",
    "make_trainer",
    "plot_loss_curve",
    "prepare_model",
    "read_adapter",
    "read_run_card",
    "split_records",
    "training_args",
    "train",
]

log = logging.getLogger(__name__)

RUN_CARD = "chatlora.json"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


@dataclass
class Split:
    train: list[Record]
    val: list[Record]
    dropped_duplicates: int = 0


def split_records(records: list[Record], val_size: float, seed: int) -> Split:
    """Seeded held-out split. Train copies of a held-out conversation are dropped so nothing evaluated is trained."""
    n_val = int(round(val_size * len(records))) if val_size < 1 else int(val_size)
    n_val = min(n_val, max(len(records) - 1, 0))
    order = list(range(len(records)))
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
    return Split(train, val, dropped)


def encode_records(records: list[Record], tokenizer, system_prompt: str | None, max_length: int):
    """Encode records for training. Returns the examples, how many were truncated, and the records dropped because
    not one trained token survived the cut (their prompt alone is longer than ``max_length``)."""
    examples, truncated, empty = [], 0, []
    for r in records:
        enc = encode_conversation(with_system(r.messages, system_prompt), tokenizer, max_length)
        truncated += enc.truncated
        if all(label == IGNORE_INDEX for label in enc.labels):
            empty.append(r)
            continue
        examples.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return examples, truncated, empty


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch; padding is masked out of attention and loss."""
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"])
        labels[i, :n] = torch.tensor(ex["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


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


def read_run_card(adapter_dir: str | Path) -> dict[str, Any]:
    """The ``chatlora.json`` of a run, or ``{}`` for an adapter trained elsewhere; ModelError naming a broken one."""
    from .files import FileError, read_json_object

    path = Path(adapter_dir) / RUN_CARD
    if not path.is_file():
        return {}
    try:
        card = read_json_object(path)
    except FileError as e:
        raise ModelError(str(e)) from None
    for key in ("base_model", "template"):  # the parts that loaders index into
        if key in card and not isinstance(card[key], dict):
            raise ModelError(f'{path}: "{key}" is {json.dumps(card[key])[:40]}: expected a JSON object')
    spec = card.get("base_model", {}).get("spec")
    if spec is not None and not isinstance(spec, str):
        raise ModelError(f'{path}: "base_model.spec" is {json.dumps(spec)[:40]}: expected the base model as a string')
    return card


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], str]:
    """Check that ``adapter_dir`` holds a PEFT adapter; return its run card and its base model spec.

    The spec is the run card's (``embedded``, a dir, a hub id), else PEFT's ``base_model_name_or_path``. A missing,
    damaged or incomplete file is a ModelError that names it.
    """
    from .files import FileError, read_json_object

    adapter = Path(adapter_dir)
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise ModelError(f"{adapter}: no adapter_config.json here; is this a chatlora output dir?")
    try:
        config = read_json_object(config_path)
    except FileError as e:
        raise ModelError(str(e)) from None
    weights = [adapter / name for name in ("adapter_model.safetensors", "adapter_model.bin")]
    if not any(w.is_file() for w in weights):
        raise ModelError(
            f"{adapter}: no adapter weights ({weights[0]} is missing): the run may not have finished; "
            "use one of its checkpoint-N folders or train again"
        )
    card = read_run_card(adapter)
    spec = card.get("base_model", {}).get("spec")
    if spec is None:
        spec = config.get("base_model_name_or_path")
        if not isinstance(spec, str) or not spec:
            raise ModelError(
                f'{config_path}: no "base_model_name_or_path": expected the base model the adapter was trained on'
            )
    return card, spec


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Training loss (and held-out loss points) against step, from ``metrics.jsonl``; None if nothing to plot."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o--", label="held-out loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def _trainer_callback(metrics_path: Path):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class RunLogger(TrainerCallback):
        """One progress bar (loss, lr, tokens/s, ETA) and one metrics.jsonl line per log, on rank 0 only."""

        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step")
            self.t0, self.tok0 = time.time(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            elapsed = max(time.time() - self.t0, 1e-9)
            row = {
                "step": state.global_step,
                "epoch": round(state.epoch or 0.0, 4),
                "time": round(time.time(), 3),
                "tokens_seen": state.num_input_tokens_seen,
            }
            row.update({k: v for k, v in logs.items() if k not in ("epoch", "step")})
            if "loss" in logs:
                row["tokens_per_second"] = round((state.num_input_tokens_seen - self.tok0) / elapsed, 1)
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if self.bar is not None:
                post = {}
                if "loss" in logs:
                    post = {"loss": f"{logs['loss']:.3f}", "lr": f"{logs.get('learning_rate', 0):.1e}"}
                    post["tok/s"] = f"{row['tokens_per_second']:.0f}"
                if "eval_loss" in logs:
                    post["eval"] = f"{logs['eval_loss']:.3f}"
                if post:
                    self.bar.set_postfix(post, refresh=True)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    return RunLogger()


def training_args(cfg: TrainConfig, precision, device, has_eval: bool):
    from transformers import TrainingArguments

    kw: dict[str, Any] = dict(
        output_dir=cfg.output_dir,
        # a packed dataset item is already a whole micro-batch of tokens_per_batch tokens
        per_device_train_batch_size=1 if cfg.packing else cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        seed=cfg.seed,
        data_seed=cfg.order_seed,
        bf16=precision.amp == "bf16",
        fp16=precision.amp == "fp16",
        gradient_checkpointing=cfg.gradient_checkpointing or cfg.memory_mode,
        # non-reentrant: works with frozen embeddings (no enable_input_require_grads hack) and with packing
        gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if has_eval and cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps if cfg.eval_steps > 0 else None,
        report_to="none",
        remove_unused_columns=False,
        # packed batches are counted on the CPU by ChatloraTrainer (the stock count syncs the GPU)
        include_num_input_tokens_seen="no" if cfg.packing else "non_padding",
        dataloader_num_workers=0,
        use_cpu=device.type == "cpu",
        ddp_find_unused_parameters=False,  # LoRA uses every trainable parameter in every step
        disable_tqdm=True,
        log_level="warning",
    )
    if cfg.fsdp:
        kw["fsdp"] = "full_shard auto_wrap"  # accelerate's FSDP plugin wraps each of model._no_split_modules
    if cfg.deepspeed:
        kw["deepspeed"] = cfg.deepspeed
    fields = TrainingArguments.__dataclass_fields__
    if cfg.group_by_length and not cfg.packing:  # packed micro-batches are already length-balanced
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
    args = TrainingArguments(**kw)
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


@dataclass
class TrainResult:
    output_dir: Path
    run_card: dict[str, Any]
    metrics_path: Path
    plot_path: Path | None
    model: Any = field(repr=False, default=None)
    tokenizer: Any = field(repr=False, default=None)
    split: Split | None = field(repr=False, default=None)


def _resume_checkpoint(cfg: TrainConfig) -> str | None:
    if not cfg.resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    if cfg.resume == "latest":
        found = get_last_checkpoint(cfg.output_dir) if Path(cfg.output_dir).is_dir() else None
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint-* folder in {cfg.output_dir} to resume from")
        return found
    if not (Path(cfg.resume) / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {cfg.resume}: not a checkpoint folder (no trainer_state.json)")
    return cfg.resume


def _trim_metrics(metrics_path: Path, checkpoint: str | None) -> None:
    """On resume, drop log lines written after the checkpoint so the curve continues without duplicates."""
    if not metrics_path.exists():
        return
    if checkpoint is None:
        metrics_path.unlink()
        return
    step = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
    rows = [line for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
    metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _collator(pad_id: int, label_index: bool, strategy: str = "pack"):
    """Collates both packed micro-batches (training with packing) and plain examples (held-out loss)."""

    def collate_any(batch: list) -> dict[str, Any]:
        if batch and isinstance(batch[0], list):  # PackedDataset items: lists of rows
            rows = [row for item in batch for row in item]
            if strategy == "bucket":
                return collate_buckets(rows, pad_id, label_index=label_index)
            return collate_packed(rows, pad_id, label_index=label_index)
        return collate(batch, pad_id)

    return collate_any


def _trainer_class(label_only: bool):
    from transformers import Trainer

    class ChatloraTrainer(Trainer):
        """Counts packed batches' real tokens on the CPU (the stock count syncs the GPU every micro-step) and,
        with ``label_only``, takes the loss from :func:`chatlora.kernels.label_only_loss`."""

        unsynced_tokens = 0  # this rank's packed tokens since the last log (several processes)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            single = self.args.world_size == 1
            real = inputs.pop("num_real_tokens", None)
            if real is not None and model.training:
                if single:
                    self.state.num_input_tokens_seen += real
                else:
                    self.unsynced_tokens += real
            # label_only_loss calls the decoder directly, which would bypass DDP's/FSDP's forward hooks
            if not label_only or not single or return_outputs or "labels" not in inputs:
                inputs.pop("label_index", None)
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # label_only_loss calls the decoder itself, bypassing the bf16/fp16 autocast that accelerate wraps around
            # model.forward; without it PEFT runs every LoRA matmul in fp32 (measured: 26 % of GPU time)
            with self.accelerator.autocast():
                loss = label_only_loss(model, inputs, num_items_in_batch)
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

    return ChatloraTrainer


def prepare_model(cfg: TrainConfig, model_path: str, device: torch.device, precision):
    """Base model in the run's dtype (random weights with ``random_init``), Liger kernels if asked, LoRA applied."""
    if cfg.random_init and device.type == "cuda":
        with torch.device(device):  # random init on the GPU: seconds instead of minutes for a 6B model
            model = load_model(model_path, precision.weights, random_init=True)
    else:
        model = load_model(model_path, precision.weights, random_init=cfg.random_init)
    model.config.use_cache = False  # a KV cache in training also hides packed-sequence boundaries from the mask
    if cfg.liger:
        model.to(device)
        apply_liger(model)
    if cfg.gradient_checkpointing or cfg.memory_mode:
        model.enable_input_require_grads()
    model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if cfg.compile and cfg.memory_mode:
        log.warning("--compile is skipped in --memory-mode: compiled layers under checkpointing measured slower")
    elif cfg.compile and (cfg.fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        # measured on 2 x H100 (bench/NOTES.md): compiled layers under DDP ran at 0.48x one compiled GPU
        log.warning("--compile is skipped when several processes train (measured slower under DDP)")
    elif cfg.compile:
        compile_layers(model)
    return model


def compile_layers(model) -> int:
    """``torch.compile`` every decoder layer in place; identical layers share one compiled graph. Returns the count."""
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile()
    return len(layers)


def make_trainer(cfg: TrainConfig, model, tokenizer, args, train_ex: list[dict], val_ex: list[dict], callbacks=()):
    """The HF Trainer for encoded examples: packed token-budget micro-batches and label-only loss when configured."""
    label_only = cfg.logits_at_labels and supports_label_only_loss(model)
    if cfg.logits_at_labels and not label_only:
        log.warning("--logits-at-labels: this model's logits are not a plain lm_head(hidden); using the full loss")
    if cfg.packing:
        budget = cfg.tokens_per_batch * (2 if cfg.memory_mode else 1)
        train_set: torch.utils.data.Dataset = PackedDataset(
            train_ex,
            cfg.max_length,
            budget,
            seed=cfg.order_seed,
            strategy=cfg.packing_strategy,
        )
    else:
        train_set = _ListDataset(train_ex)
    return _trainer_class(label_only)(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=_ListDataset(val_ex) if val_ex else None,
        data_collator=_collator(tokenizer.pad_token_id, label_only, cfg.packing_strategy),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def train(cfg: TrainConfig) -> TrainResult:
    """Run one LoRA training job end to end and write adapter, checkpoints, metrics, loss plot and run card."""
    from transformers import set_seed

    # Data first: invalid data must stop us before any model is loaded.
    records = load_records(cfg.data, cfg.format, parse_columns(cfg.columns))
    split = split_records(records, cfg.val_size, cfg.split_seed)
    checkpoint = _resume_checkpoint(cfg)

    device = pick_device(cfg.device)
    precision = pick_precision(device, cfg.dtype)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    system_prompt = cfg.system_prompt or None
    train_ex, train_trunc, train_empty = encode_records(split.train, tokenizer, system_prompt, cfg.max_length)
    val_ex, val_trunc, val_empty = encode_records(split.val, tokenizer, system_prompt, cfg.max_length)
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

    set_seed(cfg.seed)
    model = prepare_model(cfg, model_path, device, precision)
    trainable, total = model.get_nb_trainable_parameters()

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / METRICS
    args = training_args(cfg, precision, device, has_eval=bool(val_ex))
    if args.process_index == 0:
        _trim_metrics(metrics_path, checkpoint)
    trainer = make_trainer(cfg, model, tokenizer, args, train_ex, val_ex, [_trainer_callback(metrics_path)])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # our RunLogger reports instead
    started, tokens_before = time.time(), trainer.state.num_input_tokens_seen
    output = trainer.train(resume_from_checkpoint=checkpoint)
    runtime = time.time() - started
    tokens = trainer.state.num_input_tokens_seen - tokens_before
    eval_loss = None
    if val_ex:
        last = trainer.state.log_history[-2:] if trainer.state.log_history else []
        done = [h["eval_loss"] for h in last if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        eval_loss = done[0] if done else trainer.evaluate()["eval_loss"]

    trainer.save_model(str(out))  # PEFT adapter + tokenizer (with its chat template)
    plot_path = None
    card: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        plot_path = plot_loss_curve(metrics_path, out / LOSS_PLOT)
        train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        eot_token, _ = end_of_turn(tokenizer)
        card = {
            "chatlora_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": cfg.to_dict(),
            "base_model": {"spec": cfg.model, "resolved": model_path, "random_init": cfg.random_init},
            "dataset": {
                "path": str(Path(cfg.data).resolve()),
                "sha256": file_sha256(cfg.data),
                "records": len(records),
                "train_records": len(split.train),
                "val_records": len(split.val),
                "split_seed": cfg.split_seed,
                "val_size": cfg.val_size,
                "val_indices": [r.index for r in split.val],
                "dropped_duplicates_of_val": split.dropped_duplicates,
                "truncated": {"train": train_trunc, "val": val_trunc, "max_length": cfg.max_length},
                "dropped_no_reply_tokens": {"train": len(train_empty), "val": len(val_empty)},
            },
            "template": {"system_prompt": system_prompt, "end_of_turn": eot_token},
            "hardware": {
                "device": str(device),
                "precision": precision.name,
                "world_size": args.world_size,
                "distributed": "fsdp"
                if cfg.fsdp
                else "deepspeed"
                if cfg.deepspeed
                else "ddp"
                if args.world_size > 1
                else None,
                "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                if device.type == "cuda"
                else None,
            },
            "parameters": {"trainable": trainable, "total": total},
            "versions": _versions(),
            "results": {
                "global_step": trainer.state.global_step,
                "train_loss_final": train_losses[-1] if train_losses else None,
                "train_loss_mean": output.training_loss,
                "eval_loss": eval_loss,
                "eval_perplexity": math.exp(eval_loss) if eval_loss is not None and eval_loss < 50 else None,
                "tokens_seen": trainer.state.num_input_tokens_seen,
                "train_runtime_s": round(runtime, 1),
                "tokens_per_second": round(tokens / max(runtime, 1e-9), 1),
            },
        }
        (out / RUN_CARD).write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return TrainResult(out, card, metrics_path, plot_path, trainer.model, tokenizer, split)

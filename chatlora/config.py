"""Typed training configuration, mirrored by the YAML files in ``configs/``; every field is also a CLI flag."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_SYSTEM_PROMPT", "DEFAULT_TARGETS", "ConfigError", "TrainConfig", "load_config"]

# The seed tutorial's persona line for the Huanhuan data.
DEFAULT_SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(ValueError):
    """A config file or flag is invalid; the message names the key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs. YAML keys are these field names; flags are the same with dashes."""

    # data
    model: str = _f("embedded", "HF hub id, local model dir, .gguf file, or 'embedded' (SmolLM2-135M-Instruct)")
    data: str = _f("data/huanhuan.json", "dataset file: JSON array or JSONL, alpaca / messages / sharegpt")
    format: str = _f("auto", "dataset format: auto, alpaca, messages or sharegpt")
    columns: str | None = _f(None, "rename fields, e.g. 'instruction=prompt,output=response'")
    system_prompt: str | None = _f(DEFAULT_SYSTEM_PROMPT, "system prompt for records without one ('' for none)")
    max_length: int = _f(384, "max tokens per conversation; longer ones are cut after the last whole turn")
    val_size: float = _f(64, "held-out records: a count (>= 1) or a fraction (< 1) of the dataset")
    split_seed: int = _f(42, "seed of the held-out split (recorded in the run card)")
    # output
    output_dir: str = _f("runs/huanhuan-smollm2", "where the adapter, checkpoints, metrics and plot go")
    # optimisation
    epochs: float = _f(1.0, "training epochs (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: run all epochs)")
    batch_size: int = _f(8, "sequences per device per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(2e-4, "peak learning rate")
    lr_scheduler: str = _f("cosine", "learning-rate schedule (any HF Trainer scheduler name)")
    warmup_ratio: float = _f(0.03, "share of steps spent warming up the learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    seed: int = _f(42, "training seed (LoRA init, shuffling, dropout)")
    data_seed: int | None = _f(None, "seed of the data order alone (default: seed); vary it to see run-to-run noise")
    group_by_length: bool = _f(True, "batch sequences of similar length together (less padding)")
    gradient_checkpointing: bool = _f(False, "recompute activations to save memory (slower)")
    # speed (see README "Speed" and bench/NOTES.md)
    packing: bool = _f(
        False,
        "pack conversations into rows of max_length tokens, attention kept per conversation "
        "(no padding); batches then hold tokens_per_batch tokens instead of batch_size rows",
    )
    packing_strategy: str = _f(
        "pack",
        "with packing: 'pack' (several conversations per row, per-conversation "
        "attention mask) or 'bucket' (one per row, rows of like length, no mask)",
    )
    tokens_per_batch: int = _f(
        4096, "token budget of one packed micro-batch (with packing; rows = this // max_length)"
    )
    logits_at_labels: bool = _f(
        False, "compute the LM head only at trained positions (same loss; skips the [tokens, vocab] logits)"
    )
    liger: bool = _f(False, "Liger-Kernel fused RMSNorm / SwiGLU / RoPE (CUDA + liger-kernel installed; else ignored)")
    compile: bool = _f(
        False,
        "torch.compile each decoder layer (regional: one compile reused by all layers); "
        "fuses the LoRA, norm and activation element-wise ops (GPU +40 %, CPU +11 % measured); first steps are slow",
    )
    memory_mode: bool = _f(
        False,
        "trade ~1/3 speed for memory: non-reentrant gradient checkpointing, "
        "tokens_per_batch x2 (a 6B model trains in < 20 GiB)",
    )
    # several GPUs (launch with torchrun or accelerate launch; see README "Several GPUs")
    fsdp: bool = _f(False, "shard the model across GPUs (FSDP FULL_SHARD, one unit per decoder layer) instead of DDP")
    deepspeed: str | None = _f(None, "DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json); needs deepspeed")
    # LoRA
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.1, "dropout on the LoRA input")
    lora_targets: list[str] = _f(DEFAULT_TARGETS, "module names to adapt, or 'all-linear'")
    # hardware
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = _f(
        "auto", "auto (bf16 on GPUs that have it, fp16+loss scaling on others, fp32 on CPU), bf16, fp16, fp32"
    )
    random_init: bool = _f(False, "build the model from its config.json with random weights (sizing runs)")
    # logging and checkpoints
    logging_steps: int = _f(10, "log loss, lr and tokens/s every N steps")
    eval_steps: int = _f(100, "held-out loss every N steps (0: only at the end)")
    save_steps: int = _f(200, "checkpoint (adapter + optimizer + scheduler + RNG) every N steps")
    save_total_limit: int = _f(2, "keep the last K checkpoints")
    resume: str | None = _f(None, "resume from a checkpoint dir, or 'latest' in output_dir")

    def __post_init__(self) -> None:
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        checks = [
            (self.max_length > 0, "max_length", "must be > 0"),
            (self.batch_size > 0, "batch_size", "must be > 0"),
            (self.grad_accum > 0, "grad_accum", "must be > 0"),
            (self.tokens_per_batch >= self.max_length, "tokens_per_batch", "must be >= max_length"),
            (self.packing_strategy in ("pack", "bucket"), "packing_strategy", "must be pack or bucket"),
            (self.lr > 0, "lr", "must be > 0"),
            (self.lora_r > 0, "lora_r", "must be > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)"),
            (self.val_size >= 0, "val_size", "must be >= 0"),
            (self.epochs > 0 or self.max_steps > 0, "epochs", "must be > 0 unless max_steps is set"),
            (self.dtype in ("auto", "bf16", "fp16", "fp32"), "dtype", "must be auto, bf16, fp16 or fp32"),
            (
                self.format in ("auto", "alpaca", "messages", "sharegpt"),
                "format",
                "must be auto/alpaca/messages/sharegpt",
            ),
            (bool(self.lora_targets), "lora_targets", "must name at least one module"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"`--{name.replace('_', '-')}` ({name}: {getattr(self, name)!r}) {why}")

    @property
    def order_seed(self) -> int:
        """The seed of the data order: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_type(f: dataclasses.Field) -> type:
    """The plain type of a config field (``str | None`` -> ``str``, ``list[str]`` -> ``list``)."""
    hints = typing.get_type_hints(TrainConfig)
    t = hints[f.name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return typing.get_origin(t) or t


def _coerce(name: str, value: Any, kind: type) -> Any:
    # PyYAML reads `1e-4` (no dot) as a string; accept it as the number it obviously is.
    if value is None or kind in (str, list) or isinstance(value, kind):
        return value
    try:
        if kind is bool:
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"`{name}`: expected {kind.__name__}, got {value!r}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) + overrides (flags win) -> validated :class:`TrainConfig`."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"{path}: " if path else ""
        raise ConfigError(
            f"{where}unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}"
        )
    for name, value in values.items():
        values[name] = _coerce(name, value, field_type(fields[name]))
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None

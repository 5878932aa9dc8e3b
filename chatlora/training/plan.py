"""Plan a training run before any weights load: which speed-ups apply, how steps are cut into micro-batches, and
whether the run fits the device's memory.

``chatlora train`` prints the plan first and stops up front when nothing fits (``--dry-run`` stops after printing).
Every choice left unset in the config (``None``: auto) is made here from the situation, and the run card records
what applied:

- one CUDA process: packing, label-only LM head, regional ``torch.compile`` (Liger instead where compile is off);
- several processes (torchrun / accelerate): DDP with packing and the label-only head (through the wrapper's forward,
  ``logits_to_keep``), no compile (measured at 0.48x one compiled GPU);
- CPU: packing and the label-only head, no compile (measured +11 % after ~40 s of compiling: no gain on short runs).

Memory is estimated from the model's shapes (read on the ``meta`` device, no weights) and the real micro-batches
of the data: frozen weights (16, 8 or ~4.1 bits each) + LoRA weights, gradients and AdamW state (fp32) + saved
activations per token per layer (by mode: compiled, Liger, eager, checkpointed) + the LM head's logits. The
per-mode coefficients are counts of the tensors autograd saves, calibrated against measured peaks on an H200
(bench/NOTES.md, "Memory estimate"); ``make bench-gpu`` prints estimate and measurement side by side.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import ConfigError, ModelError
from ..model import Precision, check_quantize, cpu_bf16_note
from ..packing import pack_rows, plan_batches, plan_steps
from ..template import IGNORE_INDEX

__all__ = [
    "BatchPlan",
    "MemoryEstimate",
    "ModelShape",
    "RunPlan",
    "TimeEstimate",
    "auto_val_count",
    "check_limits",
    "estimate_memory",
    "estimate_time",
    "make_plan",
    "read_shape",
    "step_flops",
]

log = logging.getLogger(__name__)

GIB = 2**30
# fits when estimate x (1 + MARGIN) + RESERVE_GIB <= available: allocator rounding and fragmentation, and
# libraries' workspaces the estimate does not count
MARGIN = 0.05
RESERVE_GIB = 0.3
# bitsandbytes NF4 with double quantization: 4 bits + an 8-bit absmax per 64 weights + fp32 per 256 absmaxes
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
AUTO_VAL_MIN_RECORDS = 20
AUTO_VAL_SHARE = 0.10
AUTO_VAL_CAP = 64


def auto_val_count(n_records: int) -> int:
    """The default held-out size: 10 % of the records, at most 64, none for datasets under 20 records."""
    if n_records < AUTO_VAL_MIN_RECORDS:
        return 0
    return min(AUTO_VAL_CAP, max(1, round(AUTO_VAL_SHARE * n_records)))


# --------------------------------------------------------------------------------------------- model shape
@dataclass
class ModelShape:
    """What memory depends on, read from ``config.json`` on the meta device (no weights)."""

    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    params: int  # every parameter (tied embeddings once)
    quantizable: int  # decoder linear weights, what bitsandbytes stores in 4 bits (lm_head stays)
    lora: int  # LoRA parameters for the configured rank and targets (DoRA magnitudes included)
    dropout_inputs: int  # per layer: the input width of each adapted module (one dropout mask each)
    largest_linear: int  # out x in of the largest decoder linear (4-bit: dequantized copy at compute time)
    label_only_ok: bool  # logits are a plain lm_head(decoder(x))
    context: int | None = None  # max_position_embeddings: the longest sequence the model was made for


def read_shape(model_path: str, cfg: TrainConfig) -> ModelShape:
    """Instantiate the model on the meta device (no memory, no weights) and measure what the estimate needs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .kernels import supports_label_only_loss

    try:
        config = AutoConfig.from_pretrained(model_path)
    except OSError as e:
        raise ModelError(f"cannot read the model config of {model_path}: {e}") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = getattr(config, "get_text_config", lambda: config)()
    layers = int(text.num_hidden_layers)
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_dim = int(getattr(text, "num_key_value_heads", None) or heads) * head_dim
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    out_emb = model.get_output_embeddings()
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    quantizable = lora = dropout_inputs = largest = 0
    targets = None if cfg.lora_targets == ["all-linear"] else set(cfg.lora_targets)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is out_emb:
            continue
        quantizable += module.weight.numel()
        largest = max(largest, module.weight.numel())
        if targets is None or name.rsplit(".", 1)[-1] in targets:
            lora += cfg.lora_r * (module.in_features + module.out_features)
            lora += module.out_features if cfg.dora else 0
            dropout_inputs += module.in_features
    if cfg.lora_layers > layers:
        raise ModelError(f"--lora-layers {cfg.lora_layers}: this model has {layers} decoder layers")
    if 0 < cfg.lora_layers < layers:  # adapters in the last lora_layers layers only
        lora, dropout_inputs = lora * cfg.lora_layers // layers, dropout_inputs * cfg.lora_layers // layers
    return ModelShape(
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        kv_dim=kv_dim,
        vocab=int(text.vocab_size),
        params=params,
        quantizable=quantizable,
        lora=lora,
        dropout_inputs=dropout_inputs // max(layers, 1),
        largest_linear=largest,
        label_only_ok=supports_label_only_loss(model),
        context=int(text.max_position_embeddings) if getattr(text, "max_position_embeddings", None) else None,
    )


def check_limits(cfg: TrainConfig, shape: ModelShape, precision: Precision, shards: int = 1) -> None:
    """Refuse, before any weights load, a ``max_length`` past the model's context and a ``max_memory_gib`` below
    what its frozen weights alone take (``shards``: FSDP's world size); a ConfigError naming the flag."""
    if shape.context is not None and cfg.max_length > shape.context:
        raise ConfigError(
            f"--max-length {cfg.max_length} is longer than this model's context of {shape.context} tokens "
            "(max_position_embeddings in its config.json): give at most that"
        )
    if cfg.max_memory_gib is not None:
        weights = _weight_bytes(shape, precision, cfg.quantize) / shards / GIB
        if cfg.max_memory_gib < weights:
            raise ConfigError(
                f"--max-memory-gib {cfg.max_memory_gib:g} is below the {weights:.3g} GiB this model's frozen weights "
                f"alone take ({precision.name}{', ' + cfg.quantize if cfg.quantize else ''}): raise it or leave it out"
            )


# --------------------------------------------------------------------------------------------- memory
@dataclass
class MemoryEstimate:
    """Estimated peak of GPU memory allocated by the run (``torch.cuda.max_memory_allocated``), in GiB."""

    weights: float
    lora: float
    activations: float
    logits: float
    total: float

    def line(self) -> str:
        return (
            f"{self.total:.1f} GiB (frozen weights {self.weights:.1f}, LoRA + AdamW {self.lora:.2f}, "
            f"activations {self.activations:.1f}, logits {self.logits:.1f})"
        )


# Bytes saved for backward per token per decoder layer, as (per hidden, per kv width, per intermediate) in units
# of the activation dtype, plus fp32 bytes per hidden. Counted from what autograd keeps for a Llama-style layer
# with LoRA (norm inputs, q/k/v/attention output, o input, MLP gate/up/activation/product), then scaled to the
# peaks measured on an H200 with the Yi-6B shape (bench/NOTES.md, "Memory estimate"): +8 % for both.
_LAYER = {
    # eager PyTorch: each RMSNorm keeps an fp32 copy of its input; SiLU output and product kept separately
    "eager": (5.4, 2.2, 4.3, 8.6),
    # Liger's fused RMSNorm (keeps the input + rstd) and SwiGLU (recomputes the activation); measured equal to
    # Inductor's fused layers
    "liger": (7.8, 2.2, 3.3, 0.0),
    "compiled": (7.8, 2.2, 3.3, 0.0),
}
DROPOUT_BYTES = 1.6  # per input element of each adapted module with lora_dropout > 0 (mask and/or dropped copy)
LABEL_LOGIT_BYTES = 12  # label-only head: fp32 logits, log-softmax and their gradient, per label per vocab entry
FULL_LOGIT_BYTES = 13  # full head: 16-bit logits, their fp32 upcast and the loss's copies, per position per entry
CONSTANT_GIB = 0.3  # cuBLAS workspaces, the loss's and optimizer's small buffers
# On a CPU the peak that matters is the process's resident memory (what an out-of-memory kill looks at): eager
# CPU kernels keep more fp32 intermediates than the GPU paths the table above was fitted to, and the allocator keeps
# freed blocks. Measured on the AVX2 EPYC (bench/NOTES.md, "CPU memory"): resident peak minus weights was 1.66-1.92x
# the activations + logits estimated here, for SFT (quickstart, 768 tokens) and DPO (1,536-6,144 tokens).
CPU_RSS_FACTOR = 1.8


def _layer_bytes(shape: ModelShape, kind: str, act: int) -> float:
    per_h, per_kv, per_i, fp32_h = _LAYER[kind]
    return act * (per_h * shape.hidden + per_kv * shape.kv_dim + per_i * shape.intermediate) + fp32_h * shape.hidden


def _weight_bytes(shape: ModelShape, precision: Precision, quantize: str | None) -> float:
    """Bytes of the frozen weights (4-bit: the decoder's linear weights in NF4, the rest in the run's dtype)."""
    wbytes = precision.weights.itemsize
    if quantize:
        return shape.quantizable * NF4_BYTES_PER_PARAM + (shape.params - shape.quantizable) * wbytes
    return shape.params * wbytes


def estimate_memory(
    shape: ModelShape,
    precision: Precision,
    quantize: str | None,
    tokens: int,
    labels: int,
    *,
    checkpointing: bool,
    compiled: bool,
    liger: bool,
    label_only: bool,
    dropout: float,
    shards: int = 1,
    cpu: bool = False,
) -> MemoryEstimate:
    """Peak memory of one training step on a micro-batch of ``tokens`` positions (padding included) of which
    ``labels`` carry a label. ``shards``: FSDP's world size (frozen weights are split across GPUs). ``cpu``: the
    process's resident peak on a CPU (:data:`CPU_RSS_FACTOR`).

    Without checkpointing the peak comes at the loss, with every layer's activations saved and the logits live;
    with it, each layer keeps only its input, and the peak is the larger of the logits (at the loss) and one
    layer's recomputed activations with its backward buffers.
    """
    act = 4 if precision.amp is None else 2  # autocast computes in 16 bits; fp32 runs keep fp32 activations
    weights = _weight_bytes(shape, precision, quantize) / shards
    lora = shape.lora * 16  # fp32 weight + gradient + AdamW's two moments
    kind = "compiled" if compiled else "liger" if liger else "eager"
    per_layer = _layer_bytes(shape, kind, act)
    if dropout > 0:
        per_layer += DROPOUT_BYTES * shape.dropout_inputs
    if label_only:
        logits = labels * shape.vocab * LABEL_LOGIT_BYTES
    else:
        logits = tokens * shape.vocab * FULL_LOGIT_BYTES
    constant = CONSTANT_GIB * GIB + (shape.largest_linear * act if quantize else 0)  # + a dequantized weight
    if checkpointing:
        one_layer = tokens * (per_layer + act * (2 * shape.intermediate + 2 * shape.hidden))
        saved = tokens * shape.layers * act * shape.hidden
        peak_extra = max(logits, one_layer)
    else:
        saved = tokens * shape.layers * per_layer
        peak_extra = logits
    if cpu:
        saved, peak_extra, logits = (x * CPU_RSS_FACTOR for x in (saved, peak_extra, logits))
    total = weights + lora + saved + peak_extra + constant
    return MemoryEstimate(
        weights=weights / GIB,
        lora=lora / GIB,
        activations=(total - weights - lora - logits) / GIB,
        logits=logits / GIB,
        total=total / GIB,
    )


# --------------------------------------------------------------------------------------------- time
# seconds per step = CALIBRATION x (the step's matmul FLOPs) / (the device's probed matmul rate, model.matmul_rate):
# the factor takes in what the FLOP count leaves out (attention, element-wise work, the optimizer, Python) and how
# far the real matmuls fall from the probe's. Fitted to measured steps (bench/NOTES.md, "Plan: time estimate"); the
# uncertainty is the spread of those fits, widened where few rows back it.
# CPU: the quickstart on the 2-core AVX2 EPYC, fp32, idle: 4.9-5.2 s/step for 390 GFLOP at a probed 170 GFLOP/s
# (2 x one core's 85: the threads scale far from perfectly on small matmuls).
# GPU: the Yi-6B recipe on one H200, bf16, compiled: 0.145-0.165 s/step (two bench calls) for 54 TFLOP at the
# bench's 773 TFLOP/s bf16 matmul rate (the compile's first minute is not counted).
CALIBRATION = {"cpu": 2.2, "cuda": 2.2}
UNCERTAINTY = {"cpu": 0.4, "cuda": 0.5}


@dataclass
class TimeEstimate:
    """How long training will take, from the device's measured matmul rate and the planned steps."""

    steps: int
    seconds_per_step: float
    flops_per_step: float  # the matmuls of one optimizer step (forward, input gradients, checkpointing's recompute)
    rate: float  # FLOP/s, measured by the probe in the run's compute dtype
    dtype: str
    device: str  # "cpu" or "cuda"
    uncertainty: float  # relative: +-

    @property
    def total_s(self) -> float:
        return self.steps * self.seconds_per_step

    def line(self) -> str:
        where = "this CPU's" if self.device == "cpu" else "this GPU's"
        return (
            f"~{_duration(self.total_s)} for {self.steps} steps ({self.seconds_per_step:.3g} s/step, from "
            f"{where} measured {self.dtype} matmul rate of {self.rate / 1e9:,.0f} GFLOP/s; "
            f"±{self.uncertainty:.0%})"
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def step_flops(
    shape: ModelShape, batches: BatchPlan, lora_layers: int, *, label_only: bool, checkpointing: bool
) -> float:
    """The matmul FLOPs of one optimizer step: every decoder linear forward (2 per weight per token), the input
    gradients back to the first adapted layer (2 more; frozen weights get no weight gradient, LoRA's are small), a
    second forward of those layers under checkpointing, and the LM head at the labelled positions (label-only head)
    or every position, forward and backward."""
    tokens = batches.tokens_per_step
    adapted = lora_layers / shape.layers if 0 < lora_layers < shape.layers else 1.0
    backward = 2 * shape.quantizable * adapted
    per_token = 2 * shape.quantizable + backward + (backward if checkpointing else 0.0)
    head_rows = tokens * batches.max_labels / max(batches.max_tokens, 1) if label_only else tokens
    return tokens * per_token + head_rows * 4 * shape.vocab * shape.hidden


def estimate_time(
    cfg: TrainConfig,
    device: torch.device,
    precision: Precision,
    shape: ModelShape,
    batches: BatchPlan,
    *,
    label_only: bool,
    checkpointing: bool,
) -> TimeEstimate:
    """The run's training time from this device's matmul rate (probed once per machine: :func:`matmul_rate`)."""
    from ..model import DTYPES, matmul_rate

    kind = "cuda" if device.type == "cuda" else "cpu"
    dtype = precision.amp or "fp32"
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * batches.steps_per_epoch)
    flops = step_flops(shape, batches, cfg.lora_layers, label_only=label_only, checkpointing=checkpointing)
    rate = matmul_rate(device, DTYPES[dtype])
    return TimeEstimate(
        steps=steps,
        seconds_per_step=CALIBRATION[kind] * flops / rate,
        flops_per_step=flops,
        rate=rate,
        dtype=dtype,
        device=kind,
        uncertainty=UNCERTAINTY[kind],
    )


# --------------------------------------------------------------------------------------------- batches
@dataclass
class BatchPlan:
    """How an optimizer step is cut into micro-batches."""

    mode: str  # "steps" (packed, recipe's steps per epoch), "tokens" (packed, fixed budget) or "padded"
    micro_batches_per_step: int  # the Trainer's gradient_accumulation_steps
    micro_batches_per_epoch: int
    max_tokens: int  # positions (padding included) of the largest micro-batch
    max_labels: int  # labelled positions of the largest micro-batch
    # the label-only head under DDP/FSDP projects rows x the columns where any row has a label (logits_to_keep)
    max_label_columns: int
    conversations_per_step: float  # mean
    tokens_per_step: float  # mean real tokens

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_batches_per_epoch / self.micro_batches_per_step)


def _label_count(ex: dict) -> int:
    return sum(1 for label in ex["labels"][1:] if label != IGNORE_INDEX)


def _labelled_columns(rows: list[list[dict]]) -> int:
    """Columns where some row (conversations packed back to back) has a label, times the rows."""
    columns: set[int] = set()
    for row in rows:
        start = 0
        for ex in row:
            columns.update(start + j for j, label in enumerate(ex["labels"][1:]) if label != IGNORE_INDEX)
            start += len(ex["input_ids"])
    return len(rows) * len(columns)


def _packed_batch(examples: list[dict], plan: list[list[list[int]]], mode: str, accum: int) -> BatchPlan:
    def size(batch: list[list[int]]) -> tuple[int, int, int]:
        width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in batch)
        labels = sum(_label_count(examples[i]) for row in batch for i in row)
        return len(batch) * width, labels, _labelled_columns([[examples[i] for i in row] for row in batch])

    sizes = [size(b) for b in plan]
    n_conv = sum(len(row) for b in plan for row in b)
    real = sum(len(ex["input_ids"]) for ex in examples)
    steps = math.ceil(len(plan) / accum)
    return BatchPlan(
        mode=mode,
        micro_batches_per_step=accum,
        micro_batches_per_epoch=len(plan),
        max_tokens=max(t for t, _, _ in sizes),
        max_labels=max(n for _, n, _ in sizes),
        max_label_columns=max(c for _, _, c in sizes),
        conversations_per_step=n_conv / steps,
        tokens_per_step=real / steps,
    )


def _padded_batch(examples: list[dict], batch_size: int, accum: int) -> BatchPlan:
    # group_by_length puts the longest conversations together: the worst micro-batch is the batch_size longest
    longest = sorted(examples, key=lambda ex: -len(ex["input_ids"]))[:batch_size]
    n = len(examples)
    steps = math.ceil(math.ceil(n / batch_size) / accum)
    return BatchPlan(
        mode="padded",
        micro_batches_per_step=accum,
        micro_batches_per_epoch=math.ceil(n / batch_size),
        max_tokens=len(longest) * len(longest[0]["input_ids"]),
        max_labels=sum(_label_count(ex) for ex in longest),
        max_label_columns=_labelled_columns([[ex] for ex in longest]),
        conversations_per_step=n / steps,
        tokens_per_step=sum(len(ex["input_ids"]) for ex in examples) / steps,
    )


def _step_splits(cfg: TrainConfig, n_conversations: int) -> list[int]:
    """Micro-batches per step to try, fastest first: the whole step in one, the recipe's own split, then halving
    the micro-batch until one conversation each."""
    per_step = cfg.batch_size * cfg.grad_accum
    splits = [1, cfg.grad_accum]
    k = cfg.grad_accum * 2
    while k < per_step and k < n_conversations:
        splits.append(k)
        k *= 2
    return list(dict.fromkeys(splits))


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class RunPlan:
    """What a run does, decided before weights load; ``to_dict()`` goes into the run card."""

    device: str
    precision: str
    quantize: str | None
    packing: bool
    logits_at_labels: bool
    compile: bool
    liger: bool
    memory_mode: bool
    world_size: int
    batches: BatchPlan
    estimate: MemoryEstimate | None
    available_gib: float | None
    fits: bool
    time: TimeEstimate | None = None  # None where it is not calibrated (several processes, a 4-bit base)
    notes: list[str] = field(default_factory=list)
    alternatives: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batches"]["steps_per_epoch"] = self.batches.steps_per_epoch
        if self.time is not None:
            d["time"]["total_s"] = round(self.time.total_s, 1)
        return d

    def lines(self) -> list[str]:
        b = self.batches
        speed = [
            name
            for name, on in (
                ("packing", self.packing),
                ("label-only LM head", self.logits_at_labels),
                ("compile", self.compile),
                ("Liger", self.liger),
                ("memory mode (checkpointing)", self.memory_mode),
            )
            if on
        ]
        batching = {
            "steps": "packed, as many steps per epoch as unpacked",
            "tokens": "packed, fixed token budget",
            "padded": "padded batches",
        }[b.mode]
        out = [
            f"plan: {self.device}, {self.precision}"
            + (f", base in {self.quantize} (QLoRA)" if self.quantize else "")
            + (f", {self.world_size} processes" if self.world_size > 1 else "")
            + f"; {', '.join(speed) or 'plain HF Trainer path'}",
            f"plan: {batching}: {b.steps_per_epoch} steps/epoch, ~{b.conversations_per_step:.1f} conversations "
            f"(~{b.tokens_per_step:.0f} tokens) per step, {b.micro_batches_per_step} micro-batch(es) per step, "
            f"largest {b.max_tokens} tokens",
        ]
        if self.estimate is not None:
            where = f" of {self.available_gib:.1f} GiB available" if self.available_gib is not None else ""
            verdict = "fits" if self.fits else "DOES NOT FIT" if self.device.startswith("cuda") else "over free RAM"
            out.append(f"plan: estimated peak memory {self.estimate.line()}{where}: {verdict}")
        if self.time is not None:
            out.append(f"plan: estimated training time {self.time.line()}")
        out += [f"plan: {n}" for n in self.notes]
        if not self.fits and self.device.startswith("cuda"):
            out += [f"plan: would fit: {a}" for a in self.alternatives] or ["plan: nothing tried fits this device"]
        return out


def _available_gib(device: torch.device, cap: float | None) -> float | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        avail = free / GIB
    else:
        avail = _cpu_available_gib()
    if cap is not None:
        avail = cap if avail is None else min(avail, cap)
    return avail


def _cpu_available_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def _fits(estimate: MemoryEstimate, available: float | None) -> bool:
    return available is None or estimate.total * (1 + MARGIN) + RESERVE_GIB <= available


def make_plan(
    cfg: TrainConfig,
    device: torch.device,
    precision: Precision,
    shape: ModelShape,
    examples: list[dict],
    world_size: int = 1,
) -> RunPlan:
    """Decide the speed-ups and micro-batches for ``examples`` (encoded training conversations) on ``device``."""
    check_quantize(cfg.quantize, device)
    notes: list[str] = []
    if device.type == "cpu" and cfg.dtype == "auto":
        notes.append(f"precision {cpu_bf16_note()}")
    several = world_size > 1 or cfg.fsdp or bool(cfg.deepspeed)
    cuda = device.type == "cuda"

    def choose(name: str, auto: bool, why_off: str | None = None) -> bool:
        """The asked value of a speed flag, else ``auto`` (noting ``why_off`` when auto leaves it off)."""
        asked = getattr(cfg, name)
        if cfg.plain:
            return False
        if asked is not None:
            return bool(asked)
        if not auto and why_off:
            notes.append(f"{name.replace('_', ' ')} off: {why_off}")
        return auto

    packing = choose("packing", True)
    label_only = choose("logits_at_labels", shape.label_only_ok, _label_only_off(shape))
    if label_only and not shape.label_only_ok:
        notes.append("label-only LM head asked for, but this model's logits are not a plain lm_head(hidden): off")
        label_only = False
    liger_installed = importlib.util.find_spec("liger_kernel") is not None

    def speed_flags(memory_mode: bool, say: list[str] | None = None) -> tuple[bool, bool]:
        """(compile, liger) for this memory mode; with ``say``, the reasons for what auto left off go there."""
        say = [] if say is None else say
        why = _compile_off(cuda, several, memory_mode, cfg)
        compiled = choose("compile", why is None)
        if compiled and why is not None and (memory_mode or several):
            say.append(f"--compile skipped: {why}")
            compiled = False
        elif not compiled and cfg.compile is None and not cfg.plain and why:
            say.append(f"compile off: {why}")
        liger = choose("liger", cuda and liger_installed and not compiled)
        if liger and not cuda:
            say.append("--liger skipped: Liger's kernels need a CUDA GPU")
            liger = False
        elif liger and not liger_installed:
            say.append("--liger skipped: liger-kernel is not installed (pip install liger-kernel)")
            liger = False
        return compiled, liger

    padded = not packing
    n_conv = len(examples)
    per_step = cfg.batch_size * cfg.grad_accum
    if padded:
        candidates = [(cfg.grad_accum, _padded_batch(examples, cfg.batch_size, cfg.grad_accum))]
    elif cfg.tokens_per_batch is not None:  # also the bucket strategy, which needs a budget
        lengths = [len(ex["input_ids"]) for ex in examples]
        plan = plan_batches(lengths, cfg.max_length, cfg.tokens_per_batch, cfg.order_seed)
        candidates = [(cfg.grad_accum, _packed_batch(examples, plan, "tokens", cfg.grad_accum))]
    else:
        lengths = [len(ex["input_ids"]) for ex in examples]
        steps = math.ceil(n_conv / per_step)
        rows = len(pack_rows(lengths, cfg.max_length))
        candidates = []
        for k in _step_splits(cfg, n_conv):
            if steps * k > rows and k > 1:
                break  # micro-batches would be smaller than one row
            plan = plan_steps(lengths, cfg.max_length, steps * k, cfg.order_seed)
            candidates.append((k, _packed_batch(examples, plan, "steps", k)))

    modes = [cfg.memory_mode] if cfg.memory_mode is not None else [False, True]
    if cfg.gradient_checkpointing and cfg.memory_mode is None:
        modes = [True]
    available = _available_gib(device, cfg.max_memory_gib)
    shards = world_size if cfg.fsdp else 1

    def estimate(batches: BatchPlan, memory_mode: bool, quantize: str | None) -> MemoryEstimate:
        compiled, liger = speed_flags(memory_mode)
        return estimate_memory(
            shape,
            precision,
            quantize,
            batches.max_tokens,
            batches.max_label_columns if several else batches.max_labels,
            checkpointing=memory_mode or cfg.gradient_checkpointing,
            compiled=compiled,
            liger=liger,
            label_only=label_only,
            dropout=cfg.lora_dropout,
            shards=shards,
            cpu=not cuda,
        )

    chosen = None
    for memory_mode in modes:
        for k, batches in candidates:
            if not memory_mode and k not in (1, cfg.grad_accum) and len(modes) > 1:
                continue  # smaller micro-batches than the recipe's measured slower than checkpointing
            est = estimate(batches, memory_mode, cfg.quantize)
            if _fits(est, available):
                chosen = (memory_mode, batches, est)
                break
        if chosen:
            break
    if chosen is None and not cuda:  # the CPU trains anyway (swap, if the machine has it); only the GPU stops
        chosen = (modes[0], candidates[0][1], estimate(candidates[0][1], modes[0], cfg.quantize))
    alternatives: list[str] = []
    if chosen is None:  # report the most frugal setting tried, and what would fit instead
        memory_mode, batches = modes[-1], candidates[-1][1]
        chosen = (memory_mode, batches, estimate(batches, memory_mode, cfg.quantize))
        if cfg.quantize is None:
            q = estimate(batches, True, "4bit")
            if _fits(q, available):
                alternatives.append(f"--quantize 4bit (QLoRA, memory mode): estimated {q.total:.1f} GiB")
        if cfg.memory_mode is False:
            alternatives.append("drop --no-memory-mode (checkpointing would be allowed)")
        alternatives.append("a smaller --max-length (fewer tokens per micro-batch) or a smaller --batch-size")
    memory_mode, batches, est = chosen
    fits = _fits(est, available)
    compiled, liger = speed_flags(memory_mode, notes)
    if memory_mode and cfg.memory_mode is None and not cfg.gradient_checkpointing:
        notes.append("memory mode on: without checkpointing the estimate does not fit")
    if batches.mode == "steps" and batches.micro_batches_per_step != 1:
        notes.append(
            f"each step is cut into {batches.micro_batches_per_step} micro-batches to fit (same gradient, slower)"
        )
    if not cuda and not fits:
        notes.append(
            "the estimate exceeds the free RAM: training goes on, swapping if the machine can, else the system may "
            "stop it; a smaller --batch-size or --max-length fits better"
        )
    timed = None
    if world_size > 1 or several or cfg.quantize or cfg.method != "sft":
        # a preference step also runs a reference pass and TRL's per-token bookkeeping, which the FLOP count leaves
        # out: 7.4 s/step estimated for configs/dpo-cpu.yaml against 15-22 s measured (loaded host)
        notes.append("no time estimate: not calibrated for several processes, a 4-bit base or a preference method yet")
    elif fits or not cuda:  # a GPU run that does not fit does not start
        checkpointing = memory_mode or cfg.gradient_checkpointing
        timed = estimate_time(
            cfg, device, precision, shape, batches, label_only=label_only, checkpointing=checkpointing
        )
    return RunPlan(
        device=str(device),
        precision=precision.name,
        quantize=cfg.quantize,
        packing=packing,
        logits_at_labels=label_only,
        compile=compiled,
        liger=liger,
        memory_mode=memory_mode,
        world_size=world_size,
        batches=batches,
        estimate=est,
        available_gib=available,
        fits=fits,
        time=timed,
        notes=notes,
        alternatives=alternatives,
    )


def _label_only_off(shape: ModelShape) -> str | None:
    if not shape.label_only_ok:
        return "this model's logits are not a plain lm_head(hidden)"
    return None


def _compile_off(cuda: bool, several: bool, memory_mode: bool, cfg: TrainConfig) -> str | None:
    """Why auto leaves ``torch.compile`` off here, or None when it turns it on."""
    if not cuda:
        return "CPU (measured +11 % after ~40 s of compiling)"
    if several:
        return "several processes (compiled DDP measured at 0.48x one compiled GPU)"
    if memory_mode:
        return "memory mode (compiled layers under checkpointing measured slower)"
    if cfg.quantize or cfg.dora:
        return "4-bit or DoRA layers (not measured compiled)"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None

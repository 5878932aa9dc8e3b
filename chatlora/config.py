"""Typed training configuration, mirrored by the YAML files in ``configs/``; every field is also a CLI flag.

One idea at about 600 lines: ``TrainConfig`` (with its ``PersonaConfig``), its checks and its YAML. The settings of
the commands that do not train are in :mod:`chatlora.settings`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = [
    "BUILTIN_DATA",
    "DEFAULT_BETA",
    "DEFAULT_SYSTEM_PROMPT",
    "METHODS",
    "DEFAULT_TARGETS",
    "SCHEDULERS",
    "SCHEDULERS_NEEDING_SETTINGS",
    "ConfigError",
    "PersonaConfig",
    "TrainConfig",
    "load_config",
    "data_system_prompt",
    "persona_from",
]

# The Chat-甄嬛 data shipped with chatlora, and the seed tutorial's persona line that goes with it (and only with it:
# another file gets no system prompt unless it carries its own or one is given).
BUILTIN_DATA = "data/huanhuan.json"
DEFAULT_SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛"
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# transformers' SchedulerType values the Trainer builds from chatlora's arguments alone (pinned against the installed
# transformers by a test, so checking a flag needs no transformers import); the last two step on the held-out loss
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "greedy",
)
ON_HELD_OUT_LOSS = ("reduce_lr_on_plateau", "greedy")
# training methods: supervised, then the preference methods chatlora.align runs on TRL's trainers, with their betas
METHODS = ("sft", "dpo", "orpo", "simpo", "kto")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0, "kto": 0.1}
# these need lr_scheduler_kwargs (min_lr, num_decay_steps), which chatlora does not pass
SCHEDULERS_NEEDING_SETTINGS = {"cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"}
POLYNOMIAL_LR_END = 1e-7  # transformers' polynomial schedule decays to this and refuses a peak lr at or below it
MAX_SEED = 2**32 - 1  # np.random.seed (transformers.set_seed) takes 0..2**32-1
# Upper bounds of the persona block's sizes: past them an eval would run for days (or never start), not measure more
MAX_DRIFT_CONTEXT = 10**6  # tokens; the model's own context caps it further at eval time
MAX_PERSONA_COUNT = 10**4  # drift conversations, drift turns, probe turns
MAX_PERSONA_TOKENS = 10**5  # max_new_tokens of a probe or drift reply
# The persona sizes an eval fits to its device when the block leaves them unset (chatlora.eval.persona.fit_sizes): on a
# CPU configs/quickstart-cpu.yaml's (probes 15 s, drift 42 s, retention 21 s on the 2-core CPU), on a GPU the full
# set (None: all probes, the model's whole context). The full set took 14 minutes on the 2-core CPU (issue 28 F).
PERSONA_SIZES = {
    "cpu": {"probes": 8, "drift_conversations": 1, "drift_context": 256, "max_new_tokens": 24},
    "gpu": {"probes": None, "drift_conversations": 4, "drift_context": None, "max_new_tokens": 64},
}


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _largest(size: str) -> int:
    return max(sizes[size] for sizes in PERSONA_SIZES.values())


@functools.cache
def _shipped_probes() -> int:
    """How many identity probes ship in ``persona_data`` (read here, not via :mod:`chatlora.eval.persona`: no torch)."""
    text = resources.files("chatlora").joinpath("persona_data", "identity_probes.jsonl").read_text(encoding="utf-8")
    return sum(1 for line in text.splitlines() if line.strip())


@dataclass
class PersonaConfig:
    """The persona section of ``chatlora eval``: does the tuned model stay in character? (README "Persona eval").

    YAML: a ``persona:`` mapping with these keys. Unset lists are derived (see :func:`chatlora.eval.persona.resolve`).
    """

    enabled: bool = _f(True, "run the persona section (identity probes, drift, retention) in eval")
    name: str | None = _f(None, "the character's name (default: the character card's name)")
    markers: list[str] | None = _f(
        None,
        "words that show the character speaking as itself, e.g. 臣妾, 本宫; a reply with any of them counts as "
        "in character (default: the card's name; for the default Huanhuan prompt its forms of address)",
    )
    forbidden: list[str] | None = _f(
        None,
        "self-descriptions the character must not use (AI, 助手, 人工智能, 语言模型, OpenAI, ...); "
        "default: a built-in list plus the base model's vendor names",
    )
    vendors: list[str] | None = _f(
        None, "names of the base model's maker and family, forbidden too (default: derived from the model's name)"
    )
    probes: int | None = _f(
        None, "identity probes asked, Chinese and English alternating (unset: all shipped on a GPU, 8 on a CPU)"
    )
    probe_turns: int = _f(2, "in-character turns (from the held-out records) before each probe in its second asking")
    drift_conversations: int | None = _f(
        None, "long conversations for the drift measurement (0: skip it; unset: 4 on a GPU, 1 on a CPU)"
    )
    drift_turns: int = _f(20, "user turns per drift conversation, the model's own replies fed back")
    drift_context: int | None = _f(
        None,
        "tokens a drift turn may hold, prompt + reply; the oldest exchanges are dropped to fit, the system prompt "
        "stays (unset: the model's context length on a GPU, 256 on a CPU)",
    )
    max_new_tokens: int | None = _f(
        None, "reply token limit for probes and drift turns (unset: 64 on a GPU, 24 on a CPU)"
    )
    retention: bool = _f(True, "loss on the shipped general prompts, base vs tuned and per checkpoint")

    def __post_init__(self) -> None:
        for name in ("markers", "forbidden", "vendors"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [t.strip() for t in value.split(",") if t.strip()])
        n, shipped = MAX_PERSONA_COUNT, _shipped_probes() if self.probes is not None else 0
        checks = [
            (
                self.markers != [],
                "markers",
                "is empty: list the character's markers, or leave the key out for the default",
            ),
            (
                self.probes is None or 0 < self.probes <= shipped,
                "probes",
                f"must be 1 to {shipped}, the probes shipped (unset: all)",
            ),
            (0 <= self.probe_turns <= n, "probe_turns", f"must be 0 to {n}"),
            (
                self.drift_conversations is None or 0 <= self.drift_conversations <= n,
                "drift_conversations",
                f"must be 0 to {n} (0: no drift measurement)",
            ),
            (0 < self.drift_turns <= n, "drift_turns", f"must be 1 to {n}"),
            (
                self.max_new_tokens is None or 0 < self.max_new_tokens <= MAX_PERSONA_TOKENS,
                "max_new_tokens",
                f"must be 1 to {MAX_PERSONA_TOKENS}",
            ),
            (
                self.drift_context is None or self.drift_context > (self.max_new_tokens or _largest("max_new_tokens")),
                "drift_context",
                "must be > max_new_tokens (room for a prompt and its reply; unset, max_new_tokens is up to "
                f"{_largest('max_new_tokens')})",
            ),
            (
                self.drift_context is None or self.drift_context <= MAX_DRIFT_CONTEXT,
                "drift_context",
                f"must be at most {MAX_DRIFT_CONTEXT} tokens (unset: the model's context length)",
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"`persona.{name}` ({getattr(self, name)!r}) {why}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig:
    """Everything a training run needs. YAML keys are these field names; flags are the same with dashes."""

    # data
    model: str = _f("embedded", "HF hub id, local model dir, .gguf file, or 'embedded' (SmolLM2-135M-Instruct)")
    data: str = _f(BUILTIN_DATA, "dataset file: JSON array or JSONL, alpaca / messages / sharegpt")
    datasets: list[dict] | None = field(
        default=None,
        metadata={
            "help": "several sources mixed in one SFT run (YAML `datasets:` list of path, format, columns, weight; "
            "on the command line a repeated --data); the first is the run's data (its held-out split is the run's), "
            "'retention' names the shipped general prompts",
            "yaml_only": True,
        },
    )
    data_weights: str | None = _f(
        None,
        "with several --data, how many times each source's records are seen per epoch, e.g. 3,1 (0.5: a seeded "
        "half); default 1 each",
    )
    format: str = _f("auto", "dataset format: auto, alpaca, messages or sharegpt")
    columns: str | None = _f(None, "rename fields, e.g. 'instruction=prompt,output=response'")
    system_prompt: str | None = _f(
        None,
        "system prompt added to records without one ('' for none); unset: none, except the built-in Huanhuan prompt "
        f"for the built-in data ({BUILTIN_DATA}); records that carry their own keep it",
    )
    max_length: int = _f(384, "max tokens per conversation; longer ones are cut after the last whole turn")
    val_size: float | None = _f(
        None,
        "held-out records: a count (>= 1) or a fraction (< 1) of the dataset; unset (auto): 10 % capped at 64, "
        "none for datasets under 20 records",
    )
    character: str | dict | None = _f(
        None,
        "Character Card V2 (JSON or PNG) compiled into the system prompt (replaces system_prompt); in YAML also a "
        "`character:` mapping of the card's fields (name, description, personality, scenario, first_mes, "
        "mes_example, system_prompt)",
    )
    persona: PersonaConfig = field(
        default_factory=PersonaConfig,
        metadata={"help": "persona eval settings (YAML `persona:` mapping only)", "yaml_only": True},
    )
    split_seed: int = _f(42, "seed of the held-out split (recorded in the run card)")
    allow_small_train: bool = _f(False, "allow a held-out split larger than what is left to train on")
    train_on_prompt: bool = _f(
        False,
        "train on every token (system prompt, user turns, template), not only the replies: more supervised tokens "
        "per forward pass; held-out loss still counts the replies only",
    )
    train_on_user: bool = _f(
        False,
        "also train on the user turns' text (not the system prompt or the template's tokens): more of the same "
        "dialogue per forward pass at almost no cost; held-out loss still counts the replies only",
    )
    min_reply_chars: int = _f(
        0,
        "drop training records whose replies are all shorter than this many characters (held-out records are kept): "
        "a model trained on many one-line acknowledgements answers in one line under greedy decoding; 0: keep all",
    )
    # preference tuning (README "Preference tuning")
    method: str = _f(
        "sft",
        "sft (supervised, on dialogue data), or preference tuning on pairs (--data a preference file, e.g. from "
        "`chatlora pairs`): dpo, orpo, simpo or kto (TRL's trainers; pip install 'chatlora[pref]')",
    )
    beta: float | None = _f(
        None,
        "preference strength (unset: the method's default): DPO's and KTO's weight of the margin against the "
        "reference (0.1), ORPO's odds-ratio weight (0.1), SimPO's reward scale (2.0)",
    )
    sft_weight: float = _f(
        0.0,
        "DPO only: weight of an SFT loss on the chosen reply added to DPO's (RPO; TRL's sigmoid + sft losses), which "
        "keeps the chosen reply and its end-of-turn token likely; 0: plain DPO",
    )
    from_adapter: str | None = _f(
        None,
        "start from this chatlora run's adapter (e.g. the SFT run) and train it further (its rank and targets); "
        "DPO and KTO measure against it as their reference",
    )
    report_to: str = _f(
        "none",
        "experiment trackers, the Trainer's integrations, comma-separated: none, tensorboard (event files in "
        "OUTPUT_DIR/runs/), wandb, mlflow, ... (installed separately)",
    )
    # output
    output_dir: str = _f("runs/huanhuan-smollm2", "where the adapter, checkpoints, metrics and plot go")
    # optimisation
    epochs: float = _f(1.0, "training epochs (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: run all epochs)")
    batch_size: int = _f(
        8, "conversations per micro-batch (packed: a step holds batch_size x grad_accum conversations on average)"
    )
    grad_accum: int = _f(1, "micro-batches per optimizer step: a step trains on batch_size x grad_accum conversations")
    lr: float = _f(2e-4, "peak learning rate")
    lr_scheduler: str = _f(
        "cosine",
        "learning-rate schedule: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, "
        "inverse_sqrt, or on the held-out loss (needs eval_steps > 0) reduce_lr_on_plateau, greedy",
    )
    warmup_ratio: float = _f(0.03, "share of steps spent warming up the learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    neftune_noise_alpha: float = _f(
        0.0,
        "NEFTune: uniform noise of this scale on the input embeddings while training (HF Trainer's "
        "neftune_noise_alpha; 5 in the paper); 0: off",
    )
    seed: int = _f(42, "training seed (LoRA init, shuffling, dropout)")
    data_seed: int | None = _f(None, "seed of the data order alone (default: seed); vary it to see run-to-run noise")
    group_by_length: bool = _f(True, "without packing: batch sequences of similar length together (less padding)")
    gradient_checkpointing: bool = _f(False, "recompute activations to save memory (slower; memory_mode sets it)")
    # speed: unset (auto) picks the fastest path measured for the device (README "Speed", bench/NOTES.md)
    plain: bool = _f(False, "the plain HF Trainer path: no packing, label-only head, compile or Liger (to compare)")
    packing: bool | None = _f(
        None,
        "pack conversations into rows of max_length tokens, attention kept per conversation (no padding); "
        "auto: on (off with --plain)",
    )
    packing_strategy: str = _f(
        "pack",
        "with packing: 'pack' (several conversations per row, per-conversation "
        "attention mask) or 'bucket' (one per row, rows of like length, no mask)",
    )
    tokens_per_batch: int | None = _f(
        None,
        "with packing, a fixed token budget per micro-batch (rows = this // max_length); unset: each step holds "
        "as many tokens as batch_size x grad_accum conversations, as many steps per epoch as without packing",
    )
    logits_at_labels: bool | None = _f(
        None,
        "compute the LM head only at trained positions (same loss; skips the [tokens, vocab] logits); "
        "auto: on for one process",
    )
    liger: bool | None = _f(
        None,
        "Liger-Kernel fused RMSNorm / SwiGLU / RoPE; auto: on where installed, on CUDA, for uncompiled runs",
    )
    compile: bool | None = _f(
        None,
        "torch.compile each decoder layer (regional: one compile reused by all layers); auto: on for one CUDA "
        "process without memory_mode (GPU +40 %, measured), off on CPU (+11 % after ~40 s of compiling)",
    )
    memory_mode: bool | None = _f(
        None,
        "trade ~1/3 speed for memory: non-reentrant gradient checkpointing (+ Liger where installed); "
        "auto: on when the estimate says the run would not fit otherwise",
    )
    max_memory_gib: float | None = _f(
        None, "plan for at most this much GPU memory (default: what the GPU has free), e.g. 22 for a 24 GB card"
    )
    # several GPUs (launch with torchrun or accelerate launch; see README "Several GPUs")
    fsdp: bool = _f(False, "shard the model across GPUs (FSDP FULL_SHARD, one unit per decoder layer) instead of DDP")
    deepspeed: str | None = _f(None, "DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json); needs deepspeed")
    # LoRA
    lora_r: int = _f(8, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    lora_dropout: float = _f(0.1, "dropout on the LoRA input")
    lora_targets: list[str] = _f(DEFAULT_TARGETS, "module names to adapt, or 'all-linear'")
    lora_layers: int = _f(
        0,
        "adapt only the last N decoder layers (0: all): backpropagation then stops below them, so a step costs less "
        "(on a CPU, half the layers saved ~a quarter of each step)",
    )
    dora: bool = _f(False, "DoRA: weight-decomposed LoRA (peft use_dora; slower, sometimes better at low rank)")
    rslora: bool = _f(False, "rank-stabilized LoRA: scale alpha / sqrt(r) instead of alpha / r (peft use_rslora)")
    quantize: str | None = _f(
        None, "'4bit': QLoRA, the frozen base in 4-bit NF4 with double quantization (CUDA + bitsandbytes)"
    )
    # hardware
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = _f(
        "auto",
        "auto (bf16 on GPUs that have it, fp16 + loss scaling on others, fp32 on CPU), bf16, fp16, fp32; "
        "the frozen base is stored in it, LoRA weights and their optimizer state stay fp32",
    )
    random_init: bool = _f(False, "build the model from its config.json with random weights (sizing runs)")
    # logging and checkpoints
    logging_steps: int = _f(10, "log loss, lr and tokens/s every N steps")
    eval_steps: int = _f(
        100, "held-out loss every N steps (0: only at the end; -1: never, as when `chatlora eval` follows)"
    )
    save_steps: int = _f(200, "checkpoint (adapter + optimizer + scheduler + RNG) every N steps")
    save_total_limit: int = _f(2, "keep the last K checkpoints")
    samples: bool = _f(
        False,
        "at each checkpoint, a greedy reply (48 new tokens, adapter on, the training chat template) to "
        "sample_prompt, appended to samples.jsonl in output_dir (the studio turns it on)",
    )
    sample_prompt: str | None = _f(
        None,
        "the user turn the checkpoint samples answer (unset: the first held-out record's, else the first "
        "training record's)",
    )
    resume: str | None = _f(None, "resume from a checkpoint dir, or 'latest' in output_dir")
    overwrite: bool = _f(False, "replace the run already in output_dir (its checkpoints, adapter, metrics, card)")

    def __post_init__(self) -> None:
        if isinstance(self.persona, dict):
            self.persona = persona_from("persona", self.persona)
        self._mix_sources()
        if self.character is not None:
            self._compile_character()
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        seeds = "must be in 0..4294967295 (numpy's and torch's seed range)"
        checks = [
            (0 <= self.seed <= MAX_SEED, "seed", seeds),
            (self.data_seed is None or 0 <= self.data_seed <= MAX_SEED, "data_seed", seeds + "; unset: --seed"),
            (0 <= self.split_seed <= MAX_SEED, "split_seed", seeds),
            (self.lr_scheduler in SCHEDULERS, "lr_scheduler", f"must be one of {', '.join(SCHEDULERS)}"),
            (
                self.lr_scheduler not in ON_HELD_OUT_LOSS or self.eval_steps > 0,
                "lr_scheduler",
                "steps on the held-out loss: needs --eval-steps > 0",
            ),
            (
                self.lr_scheduler != "polynomial" or not _finite(self.lr) or self.lr > POLYNOMIAL_LR_END,
                "lr",
                f"must be > {POLYNOMIAL_LR_END:g} with polynomial decay (--lr-scheduler polynomial ends at "
                f"{POLYNOMIAL_LR_END:g})",
            ),
            (
                self.deepspeed is None or Path(self.deepspeed).is_file(),
                "deepspeed",
                "must name a JSON file that exists (e.g. configs/deepspeed/zero2.json)",
            ),
            (self.max_length > 0, "max_length", "must be > 0"),
            (self.batch_size > 0, "batch_size", "must be > 0"),
            (self.grad_accum > 0, "grad_accum", "must be > 0"),
            (
                self.tokens_per_batch is None or self.tokens_per_batch >= self.max_length,
                "tokens_per_batch",
                "must be >= max_length",
            ),
            (self.quantize in (None, "4bit"), "quantize", "must be 4bit (or unset)"),
            (self.max_memory_gib is None or self.max_memory_gib > 0, "max_memory_gib", "must be > 0"),
            (self.packing_strategy in ("pack", "bucket"), "packing_strategy", "must be pack or bucket"),
            (_finite(self.lr) and self.lr > 0, "lr", "must be a finite number > 0"),
            (self.lora_r > 0, "lora_r", "must be > 0"),
            (self.lora_layers >= 0, "lora_layers", "must be >= 0 (0: every layer)"),
            (
                _finite(self.lora_alpha) and self.lora_alpha > 0,
                "lora_alpha",
                "must be > 0 (0 trains an adapter that does nothing)",
            ),
            (0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)"),
            (
                _finite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1,
                "warmup_ratio",
                "must be in [0, 1): a share of the steps",
            ),
            (_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "must be a finite number >= 0"),
            (_finite(self.max_grad_norm) and self.max_grad_norm >= 0, "max_grad_norm", "must be a finite number >= 0"),
            (
                _finite(self.neftune_noise_alpha) and self.neftune_noise_alpha >= 0,
                "neftune_noise_alpha",
                "must be a finite number >= 0 (0: off)",
            ),
            (
                self.val_size is None or (_finite(self.val_size) and self.val_size >= 0),
                "val_size",
                "must be >= 0",
            ),
            (
                _finite(self.epochs) and (self.epochs > 0 or self.max_steps > 0),
                "epochs",
                "must be > 0 unless max_steps is set",
            ),
            (self.max_steps == -1 or self.max_steps > 0, "max_steps", "must be > 0, or -1 for all epochs"),
            (self.min_reply_chars >= 0, "min_reply_chars", "must be >= 0 (0: keep all)"),
            (self.logging_steps > 0, "logging_steps", "must be > 0"),
            (self.eval_steps >= -1, "eval_steps", "must be > 0 (every N steps), 0 (only at the end) or -1 (never)"),
            (self.save_steps > 0, "save_steps", "must be > 0"),
            (self.save_total_limit > 0, "save_total_limit", "must be > 0"),
            (
                self.packing_strategy != "bucket" or self.tokens_per_batch is not None,
                "packing_strategy",
                "bucket needs --tokens-per-batch",
            ),
            (not (self.resume and self.overwrite), "overwrite", "and --resume contradict each other: pick one"),
            (self.dtype in ("auto", "bf16", "fp16", "fp32"), "dtype", "must be auto, bf16, fp16 or fp32"),
            (
                self.format in ("auto", "alpaca", "messages", "sharegpt"),
                "format",
                "must be auto/alpaca/messages/sharegpt",
            ),
            (bool(self.lora_targets), "lora_targets", "must name at least one module"),
            (self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}"),
            (self.beta is None or (_finite(self.beta) and self.beta > 0), "beta", "must be a finite number > 0"),
            (_finite(self.sft_weight) and self.sft_weight >= 0, "sft_weight", "must be a finite number >= 0"),
            (self.method == "dpo" or not self.sft_weight, "sft_weight", "is DPO's (--method dpo)"),
            (
                self.method != "kto" or self.batch_size > 1,
                "batch_size",
                "must be > 1 with --method kto (KTO estimates its reference point across a batch)",
            ),
            (
                self.method == "sft" or not (self.train_on_prompt or self.train_on_user or self.packing),
                "method",
                "trains on pairs of replies: --train-on-prompt, --train-on-user and --packing are SFT's",
            ),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ConfigError(f"`--{name.replace('_', '-')}` ({name}: {getattr(self, name)!r}) {why}")
        if self.plain:
            clash = [n for n in ("packing", "logits_at_labels", "compile", "liger") if getattr(self, n)]
            if clash:
                flags = ", ".join(f"--{n.replace('_', '-')}" for n in clash)
                raise ConfigError(f"`--plain` turns the speed-ups off, but {flags} asks for one; drop one of them")

    def _mix_sources(self) -> None:
        """Check the ``datasets`` list and ``data_weights``; the first source becomes ``data``/``format``/``columns``."""
        if self.data_weights is not None and not self.datasets:
            raise ConfigError("`--data-weights` weighs several sources: give --data more than once (or `datasets:`)")
        if not self.datasets:
            return
        entries = [_dataset_entry(f"datasets[{i}]", d) for i, d in enumerate(self.datasets)]
        if self.data_weights is not None:
            try:
                weights = [float(w) for w in str(self.data_weights).split(",")]
            except ValueError:
                raise ConfigError(f"`--data-weights` ({self.data_weights!r}): expected numbers like 3,1") from None
            if len(weights) != len(entries):
                raise ConfigError(
                    f"`--data-weights` ({self.data_weights}) gives {len(weights)} weights for {len(entries)} --data"
                )
            entries = [{**e, "weight": w} for e, w in zip(entries, weights, strict=True)]
        for i, e in enumerate(entries):
            if not (_finite(e["weight"]) and e["weight"] >= 0):
                raise ConfigError(f"`datasets[{i}].weight` ({e['weight']!r}) must be a finite number >= 0")
        if self.method != "sft":
            raise ConfigError("`datasets` (several --data) mixes SFT data: a preference run reads one file of pairs")
        self.datasets = entries
        self.data, self.format = entries[0]["path"], entries[0]["format"]
        self.columns = entries[0]["columns"] if entries[0]["columns"] is not None else self.columns

    def _compile_character(self) -> None:
        from .character import resolve_character

        prompt = resolve_character(self.character).prompt
        # the built-in prompt (a Huanhuan config's) gives way to a card, as it did when it was the default
        if self.system_prompt not in (None, DEFAULT_SYSTEM_PROMPT, prompt):
            raise ConfigError(
                "`--character` and `--system-prompt` both set the system prompt: the card compiles into it, "
                "so give one of them"
            )
        self.system_prompt = prompt

    @property
    def added_system_prompt(self) -> str | None:
        """The system prompt added to the records that carry none (None: they train without one)."""
        return data_system_prompt(self.data, self.system_prompt)

    @property
    def order_seed(self) -> int:
        """The seed of the data order: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_DATASET_KEYS = {"path": str, "format": str, "columns": (str, dict), "weight": (int, float)}


def _dataset_entry(where: str, entry: Any) -> dict[str, Any]:
    """One ``datasets:`` item, as a mapping with every key (a bare string is a path)."""
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict) or "path" not in entry:
        raise ConfigError(f"`{where}`: expected a mapping with a path (and format, columns, weight), got {entry!r}")
    unknown = sorted(str(k) for k in entry if k not in _DATASET_KEYS)
    if unknown:
        raise ConfigError(f"`{where}`: unknown key(s) {', '.join(unknown)}; known: {', '.join(_DATASET_KEYS)}")
    for key, kind in _DATASET_KEYS.items():
        value = entry.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ConfigError(f"`{where}.{key}`: unexpected {type(value).__name__} {value!r}")
    columns = entry.get("columns")
    if isinstance(columns, dict):
        columns = ",".join(f"{k}={v}" for k, v in columns.items())
    fmt = entry.get("format") or "auto"
    if fmt not in ("auto", "alpaca", "messages", "sharegpt"):
        raise ConfigError(f"`{where}.format` ({fmt!r}) must be auto/alpaca/messages/sharegpt")
    return {"path": entry["path"], "format": fmt, "columns": columns, "weight": float(entry.get("weight", 1.0))}


def data_system_prompt(data: str | Path, system_prompt: str | None) -> str | None:
    """The system prompt added to records of ``data`` that carry none: ``system_prompt`` when given ('' is none);
    unset, :data:`DEFAULT_SYSTEM_PROMPT` for the built-in data and None for any other file."""
    if system_prompt is not None:
        return system_prompt or None
    return DEFAULT_SYSTEM_PROMPT if Path(data).resolve() == Path(BUILTIN_DATA).resolve() else None


# Fields whose unset value (None) means "chatlora decides"; YAML may also spell it `auto`.
_AUTO = {"val_size", "packing", "tokens_per_batch", "logits_at_labels", "liger", "compile", "memory_mode"}


def field_type(f: dataclasses.Field, owner: type = TrainConfig) -> type:
    """The plain type of a config field (``str | None`` -> ``str``, ``list[str]`` -> ``list``)."""
    t = _hint(f, owner)
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return typing.get_origin(t) or t


def _hint(f: dataclasses.Field, owner: type = TrainConfig) -> Any:
    return typing.get_type_hints(owner)[f.name]


def _optional(f: dataclasses.Field, owner: type = TrainConfig) -> bool:
    t = _hint(f, owner)
    return (isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union) and type(None) in typing.get_args(
        t
    )


_EXPECTED = {str: "a string", list: "a list of strings", bool: "true or false", int: "an integer", float: "a number"}


def _coerce(where: str, name: str, value: Any, kind: type, optional: bool) -> Any:
    """One config value, checked against its field's type; ``where`` prefixes errors (``FILE: `key``` or a flag)."""

    def bad(expected: str | None = None) -> ConfigError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return ConfigError(f"{where}: expected {expected or _EXPECTED[kind]}, got {shown}")

    if value is None:
        if optional:
            return None
        raise bad()
    if isinstance(value, str) and value.strip().lower() == "auto" and name in _AUTO:
        return None
    if name == "resume" and isinstance(value, bool):
        return "latest" if value else None
    if name == "character" and isinstance(value, dict):
        from .character import character_from_block

        character_from_block(where.split(": `")[0], value)  # errors name the YAML file and the card field
        return value
    if name == "datasets":
        if not isinstance(value, list) or not value:
            raise bad("a list of sources (mappings of path, format, columns, weight)")
        return [_dataset_entry(f"{where}[{i}]", d) for i, d in enumerate(value)]
    if name == "columns" and isinstance(value, dict):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise bad("a mapping of field names to field names")
        return ",".join(f"{k}={v}" for k, v in value.items())
    if kind is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if kind is list:
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(x, str) for x in value)):
            return value
        raise bad("a list of strings (or one comma-separated string)")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        raise bad()
    # numbers: PyYAML reads `1e-4` (no dot) as a string; accept it as the number it obviously is
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad()
    try:
        number = float(value) if kind is float or isinstance(value, float) else int(value)
    except (TypeError, ValueError, OverflowError):
        if kind is int and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise bad() from None
        else:
            raise bad() from None
    if not math.isfinite(number):
        raise bad("a finite number")
    if kind is int:
        if isinstance(number, float) and not number.is_integer():
            raise bad()
        return int(number)
    return float(number)


def persona_from(where: str, value: Any) -> PersonaConfig:
    """A ``persona:`` mapping checked key by key like the top level; ``where`` prefixes errors."""
    if isinstance(value, PersonaConfig):
        return value
    if value is None:
        return PersonaConfig()
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of persona keys, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(PersonaConfig)}
    unknown = sorted(str(k) for k in value if k not in fields)
    if unknown:
        raise ConfigError(f"{where}: unknown persona key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    values = {
        k: _coerce(f"{where}.{k}", k, v, field_type(fields[k], PersonaConfig), _optional(fields[k], PersonaConfig))
        for k, v in value.items()
    }
    return PersonaConfig(**values)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) + overrides (flags win) -> validated :class:`TrainConfig`. Errors name the file and
    key (``FILE: `key`: expected ...``) or the flag."""
    from .errors import FileError
    from .files import read_input

    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        try:
            text = read_input(path, "a YAML file").decode("utf-8-sig")
            loaded = yaml.safe_load(text)
        except FileError as e:
            raise ConfigError(str(e)) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text: save the config as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer past Python's 4300-digit limit
            raise ConfigError(f"{path}: unreadable value in YAML: {str(e).splitlines()[0][:200]}") from None
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
        unknown = sorted(str(k) for k in loaded if k not in fields)
        if unknown:
            raise ConfigError(
                f"{path}: unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(fields))}"
            )
        for name, value in loaded.items():
            f = fields[name]
            if name == "persona":
                values[name] = persona_from(f"{path}: `persona`", value)
                continue
            values[name] = _coerce(f"{path}: `{name}`", name, value, field_type(f), _optional(f))
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in fields:
            raise ConfigError(f"unknown config key {name}; known keys: {', '.join(sorted(fields))}")
        f = fields[name]
        if name == "persona":
            values[name] = persona_from("persona", value)
            continue
        values[name] = _coerce(f"`--{name.replace('_', '-')}`", name, value, field_type(f), _optional(f))
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None

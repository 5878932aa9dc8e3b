"""Open a trained run: the one place that reads an adapter folder and loads its base model and LoRA weights.

chat, generate, serve, merge, export and eval all go through :func:`open_run` (an adapter folder) or
:func:`open_model` (a base or merged model), like nanochat's ``checkpoint_manager`` shared by its scripts. Opening
checks what a command would otherwise trip over half-way with a traceback: a changed ``adapter_config.json`` (its
``r`` no longer the weights' rank, a target module the base lacks), truncated ``adapter_model.safetensors``, missing
tokenizer files. Each is a :class:`~chatlora.errors.ModelError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .data import Record, load_records, parse_columns
from .errors import DataError, ModelError
from .model import base_quantization, dtype_for, load_model, load_tokenizer, pick_device, resolve_model
from .runcard import added_system_prompt, file_sha256, read_adapter, read_run_card, system_prompt, system_prompt_note
from .template import stop_token_ids

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "COMPLETE",
    "SAVING",
    "Run",
    "checkpoints",
    "complete_checkpoints",
    "held_out_records",
    "held_out_run",
    "is_complete",
    "load_base",
    "open_model",
    "open_run",
    "set_generation_stops",
]

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TOKENIZER_CONFIG = "tokenizer_config.json"
COMPLETE = "chatlora-complete.json"  # written last into a checkpoint-N folder, by rename (chatlora.training.rundir)
SAVING = ".chatlora-saving"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Run:
    """A chatlora output folder (``path``: PEFT adapter + run card + tokenizer), or a plain model (``path`` None).

    Build it with :func:`open_run` or :func:`open_model`, which check the files.
    """

    path: Path | None
    base_spec: str
    card: dict[str, Any] = field(default_factory=dict)
    adapter_config: dict[str, Any] = field(default_factory=dict)
    weight_shapes: dict[str, list[int]] = field(default_factory=dict)  # LoRA tensor name -> shape, from the header

    @property
    def name(self) -> str:
        return (self.path or Path(self.base_path)).name

    @cached_property
    def base_path(self) -> str:
        return resolve_model(self.base_spec)

    @cached_property
    def tokenizer(self):
        """The tokenizer training used: the adapter folder's own (it carries the chat template), else the model's."""
        return load_tokenizer(str(self.path) if self.path is not None else self.base_path)

    @property
    def system_prompt(self) -> str | None:
        """The run's one system prompt, which chat adds to prompts without one; None: none, or one per conversation."""
        return system_prompt(self.card)

    @property
    def added_system_prompt(self) -> str | None:
        """The system prompt training added to records without one (what a held-out record is rendered with)."""
        return added_system_prompt(self.card)

    @property
    def system_note(self) -> str:
        """Why the run has no single system prompt ('' when it has one, or the run card does not say)."""
        return system_prompt_note(self.card)

    @property
    def quantized(self) -> str | None:
        """How the base was quantized in training ("4bit"), or None."""
        return self.card.get("base_model", {}).get("quantize")

    def held_out(self, max_samples: int | None = None) -> tuple[list[Record], dict[str, Any]]:
        """The run's held-out records and where they came from (:func:`held_out_records`)."""
        return held_out_records(self.card, max_samples)

    def checkpoints(self, skip_step: int | None = None) -> list[tuple[int, Path]]:
        """The complete ``checkpoint-N`` adapters in the run's folder, oldest first (``skip_step``: left out)."""
        return complete_checkpoints(self.path, skip_step) if self.path is not None else []

    # ---------------------------------------------------------------- loading

    def load(self, device: str = "auto", dtype: str = "auto", base_only: bool = False, model: str | None = None):
        """The base (``model`` instead of the run's own when given) in ``dtype`` on ``device``, with the adapter
        unless ``base_only``; a base trained 4-bit loads 4-bit where that can run here."""
        net = load_base(model if model is not None else self.base_spec, device, dtype, [self])
        return net if self.path is None or base_only else self.attach(net)

    def attach(self, net, name: str = "default"):
        """Load this adapter into ``net`` (a base model, or a PEFT model holding others) as ``name``."""
        from peft import PeftModel

        if self.path is None:
            raise ModelError(f"{self.base_spec}: a model, not an adapter: nothing to attach")
        self._check_targets(net.get_base_model() if isinstance(net, PeftModel) else net)
        if isinstance(net, PeftModel):
            net.load_adapter(str(self.path), adapter_name=name)
            return net
        return PeftModel.from_pretrained(net, str(self.path), adapter_name=name)

    def merged(self, dtype: torch.dtype = torch.float32):
        """Base + adapter merged into one full-precision model on the CPU, stopping where chat does."""
        net = self.attach(load_model(self.base_path, dtype)).merge_and_unload()
        set_generation_stops(net, self.tokenizer)
        return net.eval()

    def check_base(self, config) -> None:
        """The target-module check of :meth:`attach`, before any weights load: on a skeleton of the base built from
        its ``config`` on the meta device (no memory)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        self._check_targets(skeleton)

    def _check_targets(self, base) -> None:
        """The modules named in ``adapter_config.json`` and in the weights are all in ``base``: PEFT would adapt the
        ones it finds and drop the rest with a warning (a silently different model)."""
        config = self.path / ADAPTER_CONFIG
        names = [n for n, _ in base.named_modules() if n]
        targets = self.adapter_config.get("target_modules")
        wanted = [targets] if isinstance(targets, str) else list(targets or [])
        for target in wanted:
            if isinstance(targets, str):
                found = any(re.fullmatch(target, n) for n in names)
            else:
                found = any(n == target or n.endswith("." + target) for n in names)
            if not found:
                raise ModelError(
                    f'{config}: target module "{target}" is not in the base model {self.base_spec}: the file was '
                    "changed, or the adapter belongs to another model"
                )
        present = set(names)
        for key in self.weight_shapes:
            module = _LORA_KEY.match(key)
            if module and module.group(1) not in present:
                raise ModelError(
                    f"{self.path / ADAPTER_WEIGHTS}: holds weights for {module.group(1)}, which the base model "
                    f"{self.base_spec} lacks: the adapter belongs to another model"
                )


def open_run(adapter_dir: str | Path, tokenizer: bool = True) -> Run:
    """A trained run's folder, checked: adapter config, weights (complete, of the configured rank) and, unless
    ``tokenizer`` is False (a checkpoint attached beside its run), the tokenizer."""
    path = Path(adapter_dir)
    card, spec = read_adapter(path)
    run = Run(path, spec, card, _adapter_config(path), _weight_shapes(path / ADAPTER_WEIGHTS))
    _check_rank(run)
    if not tokenizer:
        return run
    if not (path / TOKENIZER_CONFIG).is_file():
        raise ModelError(
            f"{path}: the tokenizer files are missing ({TOKENIZER_CONFIG} is not there): a run keeps the tokenizer it "
            f"trained with beside the adapter; copy the base model's tokenizer files back ({spec}) or train again"
        )
    run.tokenizer  # noqa: B018 - loaded now, so a damaged tokenizer fails before any weights load
    return run


def open_model(spec: str) -> Run:
    """A base or merged model (hub id, dir, .gguf, 'embedded'), with the run card a merged dir keeps."""
    card = read_run_card(spec) if spec and Path(spec).is_dir() else {}
    return Run(None, spec, card)


def load_base(spec: str, device: str = "auto", dtype: str = "auto", runs: list[Run] | tuple[Run, ...] = ()):
    """The base model ``spec`` for inference, on ``device`` in ``dtype``: as ``runs`` were trained (4-bit) where
    that can run here, else in full precision."""
    dev = pick_device(device)
    adapters = [r.card for r in runs if r.path is not None]
    quantize = base_quantization(adapters, dev) if adapters else None
    return load_model(resolve_model(spec), dtype_for(dev, dtype), dev, quantize=quantize)


def set_generation_stops(model, tokenizer) -> None:
    """Make ``generation_config`` stop where chat generation does: at the end-of-turn token (then EOS).

    A base model's config often names only its pretraining EOS (Yi: 2, while replies end with ``<|im_end|>`` = 7),
    so a merged model would never stop in runtimes that read ``generation_config.json``.
    """
    ids = stop_token_ids(tokenizer)
    model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------- checks


def _adapter_config(path: Path) -> dict[str, Any]:
    config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))  # read_adapter parsed it already
    where = path / ADAPTER_CONFIG
    r = config.get("r")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        raise ModelError(f'{where}: "r" is {json.dumps(r)[:40]}: expected the LoRA rank, a positive integer')
    targets = config.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise ModelError(f'{where}: "target_modules" is {json.dumps(targets)[:60]}: expected a list of module names')
    return config


def _weight_shapes(weights: Path) -> dict[str, list[int]]:
    """The LoRA tensors' shapes from the safetensors header; opening it proves the file is whole (safetensors
    refuses a file that its header does not exactly cover). {} for a ``.bin`` adapter (not checked)."""
    if not weights.is_file():
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys() if _LORA_KEY.match(k)}
    except (SafetensorError, OSError) as e:
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ModelError(
            f"{weights}: damaged or truncated adapter weights ({why}); use one of the run's checkpoint-N folders "
            "or train again"
        ) from None


def _check_rank(run: Run) -> None:
    """Every LoRA pair in the weights has the rank ``adapter_config.json`` gives its module (``r``, or a
    ``rank_pattern`` entry): otherwise PEFT builds other shapes and fails on a size mismatch."""
    r = run.adapter_config.get("r")
    pattern = run.adapter_config.get("rank_pattern") or {}
    if r is None:
        return
    for key, shape in run.weight_shapes.items():
        module, side = _LORA_KEY.match(key).groups()
        want = next((v for k, v in pattern.items() if re.match(rf"(.*\.)?{k}$", module)), r)
        have = shape[0] if side == "A" else shape[-1]
        if len(shape) == 2 and have != want:
            raise ModelError(
                f'{run.path / ADAPTER_CONFIG}: "r" is {want} for {module}, but {run.path / ADAPTER_WEIGHTS} holds '
                f"rank-{have} weights there: the file was changed; set it back to {have}"
            )


# ---------------------------------------------------------------- a run's data and checkpoints


def held_out_records(card: dict[str, Any], max_samples: int | None = None) -> tuple[list[Record], dict[str, Any]]:
    """The run's held-out records, reloaded from the dataset named in its run card, and where they came from.

    Warns (log) when the file's sha256 differs from the one recorded at training time: the indices may then point
    at different conversations than the ones held out.
    """
    ds = card.get("dataset") or {}
    if "val_indices" not in ds or "path" not in ds:
        raise ModelError("the run card records no held-out split (dataset.val_indices); pass --data PATH")
    path = Path(ds["path"])
    if not path.is_file():
        raise DataError([f"{path}: the run's dataset is gone; pass --data PATH to evaluate another file"])
    sha = file_sha256(path)
    if ds.get("sha256") and sha != ds["sha256"]:
        log.warning(
            "%s changed since training (sha256 %s, run card %s): held-out indices may not match",
            path,
            sha[:12],
            ds["sha256"][:12],
        )
    cfg = card.get("config") or {}
    records = load_records(path, cfg.get("format", "auto"), parse_columns(cfg.get("columns")))
    by_index = {r.index: r for r in records}
    missing = [i for i in ds["val_indices"] if i not in by_index]
    if missing:
        raise DataError([f"{path}: held-out indices {missing[:5]} are not in the file (was it changed?)"])
    picked = [by_index[i] for i in ds["val_indices"]][: max_samples or None]
    source = {
        "kind": "held-out",
        "path": str(path),
        "sha256": sha,
        "sha256_matches_run": sha == ds.get("sha256"),
        "records": len(picked),
        "held_out_records": len(ds["val_indices"]),
    }
    return picked, source


def held_out_run(run_dir: str | Path, card: dict[str, Any]) -> tuple[Path, dict[str, Any]] | None:
    """The run whose held-out conversations evaluate the run in ``run_dir`` (``card``: its run card), and that run's
    card: the run itself when it held out conversations (an SFT run with a held-out split), else the run it started
    from (``--from-adapter``, as its card records it), followed back until one did; None when none did.

    A preference run holds out pairs, not conversations: measured on its SFT run's held-out split, the two runs
    are compared on the same records (which ``chatlora pairs`` left out of the pairs).
    """
    path, seen = Path(run_dir), set()
    while True:
        config = card.get("config") or {}
        if (config.get("method") or "sft") == "sft" and (card.get("dataset") or {}).get("val_indices"):
            return path, card
        start = config.get("from_adapter")
        if not start or Path(start).resolve() in seen:
            return None
        seen.add(Path(start).resolve())
        if not (Path(start) / ADAPTER_CONFIG).is_file():
            raise ModelError(
                f"{path}: started from {start} (--from-adapter), whose held-out records it is measured on, and that "
                "run is gone: pass --data PATH"
            )
        path, card = Path(start), read_run_card(start)


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` folders of ``out``, oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def complete_checkpoints(out: Path, skip_step: int | None = None) -> list[tuple[int, Path]]:
    """The complete ``checkpoint-N`` adapters of ``out``, oldest first (``skip_step``: left out)."""
    return [
        (step, path)
        for step, path in checkpoints(out)
        if step != skip_step and is_complete(path) and (path / ADAPTER_CONFIG).is_file()
    ]


def is_complete(ckpt: Path) -> bool:
    """Marked complete by chatlora; or, for checkpoints of older versions (no mark, no 'saving' flag), a readable
    trainer state, which the Trainer writes last."""
    if (ckpt / COMPLETE).is_file():
        return True
    if (ckpt / SAVING).exists():
        return False
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and "global_step" in state

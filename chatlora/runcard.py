"""What a run leaves on disk, read and written in one place: the run card, the adapter check, metrics, loss plot.

A chatlora output dir holds a PEFT adapter, ``chatlora.json`` (the run card: config, base model, dataset and its
held-out split, template, plan, results), ``metrics.jsonl`` and ``loss.png``. Training writes them; chat, generate,
serve, eval, merge and export only read them, through this module, so none of them needs the trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from .errors import FileError, ModelError
from .files import read_json_object

__all__ = [
    "LOSS_PLOT",
    "METRICS",
    "SAMPLES",
    "RUN_CARD",
    "added_system_prompt",
    "file_sha256",
    "json_safe",
    "plot_loss_curve",
    "read_adapter",
    "read_metrics",
    "read_run_card",
    "system_prompt",
    "system_prompt_note",
    "write_run_card",
]

log = logging.getLogger(__name__)

RUN_CARD = "chatlora.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"  # a reply to a fixed prompt at each checkpoint (train --samples)
LOSS_PLOT = "loss.png"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def json_safe(value: Any) -> Any:
    """JSON has no NaN or Infinity: a non-finite number (an fp16 overflow's grad norm) is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------- the run card


def read_run_card(adapter_dir: str | Path) -> dict[str, Any]:
    """The ``chatlora.json`` of a run, or ``{}`` for an adapter trained elsewhere; ModelError naming a broken one."""
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


def write_run_card(folder: str | Path, card: dict[str, Any]) -> Path:
    """Write ``card`` as ``folder/chatlora.json``: strict JSON (a non-finite number becomes null), UTF-8."""
    path = Path(folder) / RUN_CARD
    path.write_text(
        json.dumps(json_safe(card), ensure_ascii=False, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    return path


def system_prompt(card: dict[str, Any], default: str | None = None) -> str | None:
    """The one system prompt a run was trained with, which chat adds to prompts without one (None: it had none, or
    one per conversation); ``default`` when the card does not say."""
    return (card.get("template") or {}).get("system_prompt", default)


def _system_prompts(card: dict[str, Any]) -> dict[str, Any] | None:
    found = (card.get("template") or {}).get("system_prompts")
    return found if isinstance(found, dict) else None


def added_system_prompt(card: dict[str, Any], default: str | None = None) -> str | None:
    """The system prompt training added to the records that had none: what a held-out record is rendered with.

    Cards written before ``template.system_prompts`` added ``template.system_prompt`` to every such record.
    """
    found = _system_prompts(card)
    return found.get("added") if found is not None else system_prompt(card, default)


def system_prompt_note(card: dict[str, Any]) -> str:
    """Why a run has no single system prompt ('' when it has one, or the card does not say)."""
    found = _system_prompts(card)
    if found is None or system_prompt(card) is not None:
        return ""
    if not found.get("trained_distinct"):
        return "the run trained without a system prompt"
    return (
        f"the run trained {found['trained_distinct']} distinct system prompts, one per conversation: "
        "send the character's own as the system message"
    )


def read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], str]:
    """Check that ``adapter_dir`` holds a PEFT adapter; return its run card and its base model spec.

    The spec is the run card's (``embedded``, a dir, a hub id), else PEFT's ``base_model_name_or_path``. A missing,
    damaged or incomplete file is a ModelError that names it.
    """
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


# ---------------------------------------------------------------- metrics and the loss curve


def read_metrics(metrics_path: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (none if the file is missing); every reader of the file goes through here.

    A torn last line (the process was killed, or the disk filled, during an append) is skipped with a warning: the
    rows before it are whole. A bad line before the last is damage, not a torn append: a FileError naming the line.
    """
    path = Path(metrics_path)
    if not path.exists():
        return []
    lines = [(n, raw) for n, raw in enumerate(path.read_bytes().split(b"\n"), 1) if raw.strip()]
    rows = []
    for n, raw in lines:
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError (a torn character) are ValueErrors
            if n == lines[-1][0]:
                log.warning("%s:%d: skipped a torn last line (the run was cut off while writing it)", path, n)
                break
            raise FileError(
                f"{path}:{n}: not a metrics row ({e}); the file is damaged: delete that line (or the file) to go on"
            ) from None
        rows.append(row)
    return rows


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Training loss (and held-out loss points) against step, from ``metrics.jsonl``; None if nothing to plot."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        # a run shorter than logging_steps logs one point, which a line alone would not draw
        marker = "o" if len(train) == 1 else None
        ax.plot(*zip(*train, strict=True), marker=marker, label="train loss", color="#1f77b4")
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

"""A run's output folder: never clobber one by accident, mark checkpoints complete, resume only from complete ones.

The HF Trainer writes ``checkpoint-N/`` file by file and then deletes the oldest; a kill in between leaves a folder
with a truncated ``optimizer.pt`` or no ``trainer_state.json``. chatlora marks a checkpoint complete (a small file
written last, by rename) once every file is on disk, rotates only complete checkpoints, and ``--resume`` takes the
newest complete one, saying which incomplete ones it skipped and naming any unreadable file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

from ..errors import ModelError
from ..run import COMPLETE, SAVING, checkpoints, is_complete

__all__ = [
    "COMPLETE",
    "begin_save",
    "check_output_dir",
    "checkpoints",
    "clear_previous_run",
    "find_resume",
    "is_complete",
    "mark_complete",
    "rotate",
    "validate_checkpoint",
]

log = logging.getLogger(__name__)

# what a chatlora run writes into its folder (an --overwrite removes these, nothing else)
RUN_FILES = (
    "chatlora.json",
    "metrics.jsonl",
    "samples.jsonl",
    "loss.png",
    "adapter_config.json",
    "adapter_model.safetensors",
    "README.md",
)
RUN_DIRS = ("eval",)


def _is_run(out: Path) -> bool:
    return any((out / name).exists() for name in ("chatlora.json", "metrics.jsonl", "adapter_config.json")) or bool(
        checkpoints(out)
    )


def _probe_writable(out: Path) -> None:
    """Create ``out`` (what the run would do anyway) and write and remove a probe file in it; a read-only
    filesystem or a missing permission then fails here, before any weights load, with the folder named."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".chatlora-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ModelError(
            f"{out}: cannot be created or written ({e.strerror or e}): choose another --output-dir"
        ) from None


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that holds another run (unless resuming it or told to overwrite it), holds other
    files (unless told to overwrite), is a file, or cannot be written. Creates the folder, changes nothing in it."""
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: is a file, not a folder: choose another --output-dir")
    existed = out.is_dir()
    _probe_writable(out)
    if not existed or resume or overwrite:
        return
    if _is_run(out):
        held = ", ".join(p.name for _, p in checkpoints(out)[-2:]) or "its adapter and run card"
        raise ModelError(
            f"{out}: already holds a training run ({held}): pass --resume to continue it, --overwrite to replace it, "
            "or choose another --output-dir"
        )
    others = sorted(p.name for p in out.iterdir())
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ModelError(
            f"{out}: folder is not empty ({len(others)} entries: {shown}): choose another --output-dir, or pass "
            "--overwrite to write the run beside them (files of the same names are replaced)"
        )


def clear_previous_run(out: Path) -> None:
    """For ``--overwrite``: remove what an earlier run wrote (checkpoints, adapter, metrics, card, eval report);
    any other file stays."""
    for _, ckpt in checkpoints(out):
        shutil.rmtree(ckpt)
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
    for name in RUN_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def begin_save(ckpt: Path) -> None:
    """Before the Trainer (re)writes ``ckpt``: drop an old completion mark, leave a 'saving' flag."""
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / COMPLETE).unlink(missing_ok=True)
    (ckpt / SAVING).write_text("", encoding="utf-8")


def mark_complete(ckpt: Path, step: int) -> None:
    """After every file of ``ckpt`` is written: the mark, by rename, then the 'saving' flag goes."""
    tmp = ckpt / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({"global_step": step}) + "\n", encoding="utf-8")
    os.replace(tmp, ckpt / COMPLETE)
    (ckpt / SAVING).unlink(missing_ok=True)


def rotate(out: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; delete older ones, and incomplete ones older than the newest
    complete (never the newest complete itself)."""
    if keep is None or keep <= 0:
        return
    found = checkpoints(out)
    complete = [(s, p) for s, p in found if is_complete(p)]
    if not complete:
        return
    newest = complete[-1][0]
    doomed = [p for s, p in complete[:-keep]] + [p for s, p in found if not is_complete(p) and s < newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def validate_checkpoint(ckpt: Path) -> None:
    """Raise a :class:`ModelError` naming the first missing or unreadable file of a checkpoint."""
    state_path = ckpt / "trainer_state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or "global_step" not in state:
            raise ValueError("no global_step")
    except (OSError, ValueError) as e:
        raise ModelError(f"{state_path}: missing or unreadable ({e}); resume from another checkpoint") from None
    weights = ckpt / "adapter_model.safetensors"
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            list(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated headers
        raise ModelError(f"{weights}: missing or unreadable ({e}); resume from another checkpoint") from None
    for name in ("optimizer.pt", "scheduler.pt"):
        path = ckpt / name
        if not path.is_file():
            continue  # save_only_model checkpoints have none
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            raise ModelError(f"{path}: truncated or unreadable ({e}); resume from another checkpoint") from None
        if bad is not None:
            raise ModelError(f"{path}: corrupt entry {bad}; resume from another checkpoint")


def find_resume(out: Path, resume: str | None) -> str | None:
    """The checkpoint to resume from: ``resume`` itself, or with ``'latest'`` the newest complete one in ``out``
    (incomplete newer ones are skipped, and said so)."""
    if not resume:
        return None
    if resume != "latest":
        ckpt = Path(resume)
        if not (ckpt / "trainer_state.json").is_file() and not (ckpt / COMPLETE).is_file():
            raise ModelError(f"--resume {resume}: not a checkpoint folder (no trainer_state.json)")
        if not is_complete(ckpt):
            raise ModelError(f"--resume {resume}: this checkpoint is incomplete (the run stopped while saving it)")
        validate_checkpoint(ckpt)
        return str(ckpt)
    found = checkpoints(out)
    if not found:
        raise ModelError(f"--resume: no checkpoint-* folder in {out} to resume from")
    for _, ckpt in reversed(found):
        if is_complete(ckpt):
            validate_checkpoint(ckpt)
            return str(ckpt)
        log.warning("--resume: skipping %s: incomplete (the run stopped while saving it)", ckpt)
    raise ModelError(f"--resume: every checkpoint in {out} is incomplete; start again without --resume")

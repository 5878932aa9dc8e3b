"""What an export leaves and reports: the manifest's name, the parity table's rows."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FileError
from .quants import QUANTS

MANIFEST = "chatlora-export.json"
_MAX_MANIFEST = 1 << 20  # a manifest is a few KiB; more is not one


@dataclass
class Check:
    """One row of the parity table: ``status`` is ``PASS``, ``FAIL`` or ``SKIP`` (with the reason in ``detail``)."""

    name: str
    status: str
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


def format_checks(checks: list[Check]) -> str:
    """The parity table as text, one row per check."""
    width = max([len(c.name) for c in checks] + [5])
    lines = [f"{'check'.ljust(width)}  result  detail", f"{'-' * width}  ------  {'-' * 40}"]
    lines += [f"{c.name.ljust(width)}  {c.status.ljust(6)}  {c.detail}" for c in checks]
    return "\n".join(lines)


def _first_difference(a: str, b: str) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"first difference at character {i}: training {a[i : i + 24]!r} vs export {b[i : i + 24]!r}"


def run_commands(directory: str | Path) -> list[str]:
    """How to run an export, one line per runtime: Ollama when there is a Modelfile, llama.cpp's ``llama-cli`` with
    the trained system prompt (``-sys``) and ``llama-server``; every path and text quoted for a POSIX shell."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    gguf = str(directory / manifest["gguf"])
    base = manifest.get("base_gguf")
    lines = []
    if (directory / "Modelfile").is_file():
        name = re.sub(r"[^a-z0-9._-]+", "-", directory.resolve().name.lower()).strip("-._") or "chatlora"
        lines.append(f"ollama:       cd {shlex.quote(str(directory))} && ollama create {name} -f Modelfile")
        lines.append(f"              ollama run {name}")
    if manifest.get("lora_only") and not base:
        return lines
    model = ["-m", base, "--lora", gguf] if manifest.get("lora_only") else ["-m", gguf]
    system = manifest.get("system_prompt")
    # llama.cpp's OpenMP threads spin while they wait unless told otherwise: many times slower on a busy CPU
    cli = ["llama-cli", *model, "--jinja", "-cnv", *(["-sys", system] if system else [])]
    lines.append("llama.cpp:    OMP_WAIT_POLICY=passive " + shlex.join(cli))
    lines.append("llama-server: OMP_WAIT_POLICY=passive " + shlex.join(["llama-server", *model, "--jinja"]))
    return lines


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The manifest :func:`~chatlora.export.export` wrote, checked: one clear error for a damaged one.

    Its ``gguf`` must name a file in ``directory`` itself: a manifest never makes the check open a file elsewhere.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileError(f"{directory}: no {MANIFEST} here; is this a chatlora export directory?")
    if path.stat().st_size > _MAX_MANIFEST:
        raise FileError(f"{path}: {path.stat().st_size} bytes is no export manifest")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise FileError(f"{path}: not valid JSON{where}: the manifest is damaged; export again") from None
    if not isinstance(manifest, dict):
        raise FileError(f"{path}: not a JSON object: the manifest is damaged; export again")
    name = manifest.get("gguf")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise FileError(f"{path}: field 'gguf' must name a file in {directory}, not {name!r}")
    if not (Path(directory) / name).is_file():
        raise FileError(f"{Path(directory) / name}: the GGUF file named in {MANIFEST} is missing")
    if manifest.get("quant") not in QUANTS:
        raise FileError(f"{path}: field 'quant' is {manifest.get('quant')!r}, not one of {', '.join(QUANTS)}")
    base = manifest.get("base_gguf")
    if base is not None and not (isinstance(base, str) and base.endswith(".gguf")):
        raise FileError(f"{path}: field 'base_gguf' must be the base model's .gguf file, not {base!r}")
    return manifest

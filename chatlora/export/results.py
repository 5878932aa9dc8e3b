"""What an export leaves and reports: the manifest's name, the parity table's rows."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "chatlora-export.json"


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
    manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
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

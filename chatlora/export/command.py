"""`chatlora export`: write the folder (GGUF, Modelfile, manifest), then check it."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import FileError, ModelError
from ..model import resolve_model
from ..template import (
    end_of_turn,
    stop_token_ids,
)
from .arch import _arch, _check_supported, _rope_theta
from .lora import write_lora_gguf
from .ollama import MODELFILE, modelfile_text, ollama_template
from .parity import check_export
from .quants import LORA_QUANTS, _quant
from .results import MANIFEST, Check
from .source import _base_gguf, _open_source, _reference_model
from .vocab import _vocab
from .writer import write_gguf


@dataclass
class ExportResult:
    """What :func:`export` wrote (the GGUF file first) and the parity check's rows (empty with ``check=False``)."""

    output_dir: Path
    files: list[Path]
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)


def _check_output_is_folder(out: Path) -> None:
    """Refuse an ``--output`` that is (or lies under) an existing file: the export writes a folder of files."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out else f"lies under {path}, which is a file"
                raise FileError(f"{out}: {where}: --output must be a folder (new or empty); choose another --output")
            return


def export(
    adapter: str | Path | None = None,
    output: str | Path = "",
    model: str | Path | None = None,
    quant: str = "f16",
    lora_only: bool = False,
    overwrite: bool = False,
    check: bool = True,
    samples: int = 8,
    max_new_tokens: int = 48,
) -> ExportResult:
    """Write ``output/``: the GGUF file, an Ollama ``Modelfile`` and ``chatlora-export.json``; then check it.

    Args:
        adapter: a chatlora run dir (adapter + run card); or ``model``, a merged model dir.
        quant: one of :data:`QUANTS` (``f32``/``f16`` with ``lora_only``).
        lora_only: write the adapter alone as a llama.cpp LoRA GGUF (its Modelfile names the base GGUF, when the
            base was one).
        overwrite: allow writing into a non-empty ``output``; without it a non-empty ``output`` is an error.
        check: run :func:`check_export` afterwards (``samples`` held-out prompts, ``max_new_tokens`` per reply).
    """
    if not str(output):
        raise ModelError("--output DIR is required")
    _check_output_is_folder(Path(output))  # before the source: a file there is refused, never deleted
    src = _open_source(adapter, model)
    spec = _quant(quant) if not lora_only else None
    if lora_only and src.kind != "adapter":
        raise ModelError("--lora-only needs --adapter (a merged model has no adapter to write)")
    if lora_only and quant not in LORA_QUANTS:
        raise ModelError(f"--lora-only writes {' or '.join(LORA_QUANTS)}, not {quant}")
    out = Path(output)
    if out.resolve() == src.path.resolve():
        raise ModelError("--output must differ from the adapter/model directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ModelError(f"{out}: exists and is not empty; choose another --output or pass --overwrite")

    # Everything that can refuse the model is checked before its weights are loaded.
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(src.path) if src.kind == "model" else resolve_model(src.base_spec))
    _check_supported(config, _arch(config))
    _rope_theta(config)
    if src.run is not None:
        src.run.check_base(config)
    if not lora_only:
        _vocab(src.tokenizer, config.vocab_size)
    eot_text, _ = end_of_turn(src.tokenizer)
    stops = [src.tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(src.tokenizer)]
    template = ollama_template(src.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    reference = None
    manifest: dict[str, Any] = {
        "chatlora_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"kind": src.kind, "path": str(src.path.resolve()), "base_model": src.base_spec},
        "format": "gguf",
        "quant": quant,
        "lora_only": lora_only,
        "end_of_turn": eot_text,
        "stop": stops,
        "system_prompt": src.system_prompt,
    }
    if src.system_note:
        manifest["system_prompt_note"] = src.system_note
    files = []
    if lora_only:
        gguf_path = write_lora_gguf(src.path, out / f"{src.stem}-lora-{quant}.gguf", quant)
        base = _base_gguf(src)
        manifest["base_gguf"] = str(base) if base else None
        if base is not None:
            text = modelfile_text(
                str(base),
                template,
                src.system_prompt,
                stops,
                adapter=f"./{gguf_path.name}",
                system_note=src.system_note,
            )
            (out / MODELFILE).write_text(text, encoding="utf-8")
            files.append(out / MODELFILE)
    else:
        reference = _reference_model(src)
        gguf_path = write_gguf(reference, src.tokenizer, out / f"{src.stem}-{spec.name}.gguf", spec.name, src.stem)
        (out / MODELFILE).write_text(
            modelfile_text(f"./{gguf_path.name}", template, src.system_prompt, stops, system_note=src.system_note),
            encoding="utf-8",
        )
        files.append(out / MODELFILE)
    manifest["gguf"] = gguf_path.name
    files.insert(0, gguf_path)
    (out / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    files.append(out / MANIFEST)
    result = ExportResult(out, files)
    if check:
        result.checks = check_export(out, samples=samples, max_new_tokens=max_new_tokens, _source=src, _ref=reference)
        manifest["parity"] = [asdict(c) for c in result.checks]
        (out / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return result

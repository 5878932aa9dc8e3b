"""`chatlora export --check` on a damaged export: one clear line (exit 2) or a FAIL row, never a traceback, and
never a file outside the export folder (issue 28 D)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_export import llama_run  # noqa: F401  (the module-scoped tiny run, reused)

from chatlora.cli import main
from chatlora.export import MANIFEST, export


@pytest.fixture(scope="module")
def exported(llama_run, tmp_path_factory):  # noqa: F811
    return export(llama_run, tmp_path_factory.mktemp("x") / "f16", quant="f16", check=False).output_dir


def _damaged(exported: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(exported, out)
    edit(out / MANIFEST)
    return out


def _set(field: str, value):
    def edit(path: Path) -> None:
        manifest = json.loads(path.read_text())
        if value is KeyError:
            del manifest[field]
        else:
            manifest[field] = value
        path.write_text(json.dumps(manifest))

    return edit


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_truncate, "not valid JSON (line"),
        (lambda p: p.write_text("[1, 2]"), "not a JSON object"),
        (_set("quant", KeyError), "field 'quant' is None"),
        (_set("gguf", "/etc/passwd"), "field 'gguf' must name a file in"),
        (_set("gguf", "../f16/x.gguf"), "field 'gguf' must name a file in"),
        (_set("gguf", "gone.gguf"), "the GGUF file named in chatlora-export.json is missing"),
        (_set("base_gguf", "/etc/passwd"), "field 'base_gguf' must be the base model's .gguf file"),
    ],
)
def test_damaged_manifest_is_one_line(exported, tmp_path, capsys, edit, message):
    """Guards against a traceback on a damaged manifest, and against a manifest sending the check to open any file
    on the machine (it only opens the GGUF in the export folder)."""
    out = _damaged(exported, tmp_path, edit)
    assert main(["export", "--check", str(out), "--samples", "1", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_truncated_lora_gguf_is_a_fail_row(llama_run, tmp_path, capsys):  # noqa: F811
    """Guards against a traceback when the LoRA GGUF is cut short (a full disk, an interrupted copy)."""
    result = export(llama_run, tmp_path / "lora", lora_only=True, check=False)
    _truncate(result.files[0])
    assert main(["export", "--check", str(result.output_dir), "--samples", "1", "--max-new-tokens", "2"]) == 1
    out = capsys.readouterr().out
    assert "LoRA GGUF" in out and "does not read as GGUF" in out

"""A damaged adapter folder is one clear line naming the file (exit 2) in every command that loads a run (issue 28 D):
a changed ``adapter_config.json`` (``r`` no longer the weights' rank, a target module the base lacks), a truncated
``adapter_model.safetensors``, removed tokenizer files. All of them go through ``chatlora.run.open_run``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import write_jsonl
from test_export import llama_run  # noqa: F401  (the module-scoped tiny run, reused)

from chatlora.cli import main


def _config(edit):
    def damage(run: Path) -> None:
        path = run / "adapter_config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))

    return damage


def _truncate(run: Path) -> None:
    path = run / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])


def _remove_tokenizer(run: Path) -> None:
    for path in run.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens_map", "chat_template")):
            path.unlink()


def _remove_tokenizer_json(run: Path) -> None:
    (run / "tokenizer.json").unlink()


DAMAGE = {
    "rank": (_config(lambda c: c.update(r=c["r"] * 2)), "adapter_config.json", '"r" is'),
    "target": (
        _config(lambda c: c.update(target_modules=[*c["target_modules"], "nope_proj"])),
        "adapter_config.json",
        'target module "nope_proj" is not in the base model',
    ),
    "truncated": (_truncate, "adapter_model.safetensors", "damaged or truncated adapter weights"),
    "no tokenizer": (_remove_tokenizer, "", "the tokenizer files are missing"),
    "no tokenizer.json": (_remove_tokenizer_json, "", "files are incomplete or damaged"),
}


def _commands(run: Path, tmp: Path) -> dict[str, list[str]]:
    prompts = write_jsonl(tmp / "prompts.jsonl", [{"prompt": "hi"}])
    data = write_jsonl(tmp / "data.jsonl", [{"instruction": "hi", "input": "", "output": "yo"}])
    return {
        "chat": ["chat", "--adapter", str(run), "--prompt", "hi", "--max-new-tokens", "2"],
        "generate": ["generate", "--adapter", str(run), "--input", str(prompts), "--output", str(tmp / "out.jsonl")],
        "merge": ["merge", "--adapter", str(run), "--output", str(tmp / "merged")],
        "eval": ["eval", "--adapter", str(run), "--data", str(data), "--no-persona", "--max-new-tokens", "2"],
        "serve": ["serve", "--adapter", str(run), "--port", "1"],
        "export": ["export", "--adapter", str(run), "--output", str(tmp / "gguf"), "--quant", "f16"],
    }


@pytest.fixture
def no_serving(monkeypatch):
    """The server must never start on a damaged adapter: reaching uvicorn fails the test instead of hanging it."""
    import uvicorn

    def refuse(*args, **kwargs):
        raise AssertionError("the damaged adapter was loaded and served")

    monkeypatch.setattr(uvicorn.Server, "run", refuse)


@pytest.mark.parametrize("command", ["chat", "generate", "merge", "eval", "serve", "export"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_adapter_is_one_line_naming_the_file(llama_run, tmp_path, capsys, no_serving, damage, command):  # noqa: F811
    """Guards against a traceback (a size mismatch in PEFT, a SafetensorError, a tokenizer ValueError) or a silent
    load (PEFT drops weights whose module the changed config no longer targets) on a damaged run folder."""
    run = tmp_path / "run"
    shutil.copytree(llama_run, run)
    edit, file, message = DAMAGE[damage]
    edit(run)
    capsys.readouterr()
    assert main(_commands(run, tmp_path)[command]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(run / file) in err and message in err, err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "gguf").exists()

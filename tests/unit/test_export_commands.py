"""What `chatlora export` tells a user to run, and the sampling settings it exports (issue 28 G)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from chatlora.export import MANIFEST, modelfile_text, parse_modelfile, run_commands

SYSTEM = '现在你要扮演皇帝身边的女人--甄嬛. Say "臣妾"; it\'s $HOME `x`'


def _export_dir(tmp_path: Path, lora_only: bool = False, base: str | None = None, modelfile: bool = True) -> Path:
    out = tmp_path / "my export"  # a space: every path in a printed command must be quoted
    out.mkdir()
    manifest = {
        "gguf": "run-q8_0.gguf",
        "quant": "f16" if lora_only else "q8_0",
        "lora_only": lora_only,
        "base_gguf": base,
        "system_prompt": SYSTEM,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False))
    (out / "run-q8_0.gguf").write_bytes(b"GGUF")
    if modelfile:
        (out / "Modelfile").write_text("FROM ./run-q8_0.gguf\n")
    return out


def _argv(line: str) -> list[str]:
    return shlex.split(line.split(":", 1)[1])


def test_llama_cli_gets_the_trained_system_prompt_and_quoted_paths(tmp_path):
    """Guards against llama-cli running without the character's system prompt (llama.cpp then uses the model's
    own default) and against paths with spaces breaking the printed commands."""
    out = _export_dir(tmp_path)
    lines = run_commands(out)
    cli = next(line for line in lines if line.startswith("llama.cpp:"))
    argv = _argv(cli)
    assert argv[0] == "OMP_WAIT_POLICY=passive" and argv[1] == "llama-cli"
    assert argv[argv.index("-m") + 1] == str(out / "run-q8_0.gguf")
    assert argv[argv.index("-sys") + 1] == SYSTEM
    ollama = next(line for line in lines if line.startswith("ollama:"))
    assert _argv(ollama)[:2] == ["cd", str(out)] and "ollama create my-export -f Modelfile" in ollama


def test_lora_only_commands_name_the_base(tmp_path):
    """Guards against a LoRA-only command that loads the adapter file as if it were a model."""
    base = str(tmp_path / "base dir" / "base.gguf")
    argv = _argv(next(x for x in run_commands(_export_dir(tmp_path, True, base)) if x.startswith("llama.cpp:")))
    assert argv[argv.index("-m") + 1] == base and argv[argv.index("--lora") + 1].endswith("run-q8_0.gguf")


def test_lora_only_without_a_base_gguf_prints_no_llama_cpp_command(tmp_path):
    """Guards against printing a llama.cpp command with no base model to apply the LoRA to."""
    assert run_commands(_export_dir(tmp_path, True, None, modelfile=False)) == []


def test_modelfile_exports_only_sampling_that_means_the_same():
    """Guards against PARAMETER repeat_penalty 1.1: Ollama's penalty looks at the last 64 tokens, transformers'
    at the whole sequence (with it, 0/8 greedy replies matched in llama.cpp)."""
    text = modelfile_text("./m.gguf", "{{ .Prompt }}", None, ["<|im_end|>"])
    params = parse_modelfile(text)["PARAMETER"]
    assert params["repeat_penalty"] == ["1.0"]
    assert set(params) == {"stop", "temperature", "top_p", "top_k", "repeat_penalty"}
    assert "Not exported: chatlora chat's repetition_penalty" in text

"""Issue 22's end-to-end claim, from the command line: for the model families people tune (Yi's shape, Mistral,
Qwen3, Gemma 3), `chatlora train` for 2 steps, then `chatlora export --quant q8_0` and `--quant q4_k_m` exit 0
and their parity tables pass, the real llama.cpp rows included (llama-cpp-python, the test extra).

Each base is a tiny model of its architecture with its family's real kind of vocabulary and chat template, wide
enough (hidden 256) for K-quant super-blocks, and nearly a bigram model whose every prediction wins by a wide
margin, so llama.cpp's kernels (8-bit activations) reply like transformers to the token.
"""

from __future__ import annotations

import json

import pytest
from conftest import vocab_tokenizer, write_jsonl
from test_export import make_model_dir
from test_export_arch import family_tokenizer

from chatlora.cli import main
from chatlora.export import MANIFEST

pytest.importorskip("llama_cpp", reason="llama-cpp-python is in the test extra (make install)")

REPLY = "Hello world, this is a tiny tokenizer."
FAMILIES = {  # name -> HF model_type
    "yi": "llama",  # Llama 2's sentencepiece vocabulary with the ChatML markers added: Yi-6B-Chat's shape
    "mistral": "mistral",
    "qwen3": "qwen3",
    "gemma3": "gemma3_text",
}
# Gemma 2 is not here: llama.cpp's gemma2 graph has no output layer of its own, so export refuses untied Gemma 2
# embeddings, and this test's confident bigram models need an untied one. test_export_arch.py exports a tied Gemma 2
# at q8_0 with every row (the llama.cpp row included where llama-cpp-python is installed).
ROWS = [
    {"instruction": f"你是谁？ Who are you? {i}", "input": "", "output": "臣妾甄嬛。" if i % 2 else "皇上万福金安。"}
    for i in range(12)
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_then_export_q8_0_and_q4_k_m_pass_with_llama_cpp(family, tmp_path, capsys):
    """Guards against any family's export failing the check, or passing it only where llama.cpp was not asked."""
    arch = FAMILIES[family]
    tok = vocab_tokenizer("llama-spm") if family == "yi" else family_tokenizer(arch)
    base = make_model_dir(tmp_path / "base", tok, arch=arch, hidden=256, reply=REPLY)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    run = tmp_path / "run"
    train = ["train", "--model", str(base), "--data", str(data), "--output-dir", str(run), "--max-steps", "2"]
    train += ["--batch-size", "4", "--val-size", "4", "--lora-r", "4", "--lora-alpha", "8", "--save-steps", "100"]
    train += ["--system-prompt", "You are Zhen Huan, a consort of the Qing court."]  # folded where no system turn
    assert main(train) == 0
    for quant in ("q8_0", "q4_k_m"):
        out = tmp_path / quant
        argv = ["export", "--adapter", str(run), "--output", str(out), "--quant", quant]
        assert main([*argv, "--samples", "3", "--max-new-tokens", "12"]) == 0, capsys.readouterr().out[-3000:]
        rows = {c["name"]: c for c in json.loads((out / MANIFEST).read_text())["parity"]}
        assert rows["llama.cpp (library)"]["status"] == "PASS", rows["llama.cpp (library)"]
        assert not [name for name, c in rows.items() if c["status"] == "FAIL"]

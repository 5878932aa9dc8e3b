"""Real tokenizers for the tests, without a model hub: llama.cpp's vocabulary-only GGUF files.

llama.cpp's source tree ships ``models/ggml-vocab-*.gguf`` (MIT licence, see LICENSE.llama.cpp written beside the
tokenizers): the tokenizers of real model families without their weights. Its Python binding's sdist, on PyPI,
carries that tree. ``make install`` runs this script once: it downloads the sdist with pip, converts the files
named in ``VOCABS`` to Hugging Face tokenizer folders under ``.cache/vocab/NAME`` (loading a GGUF tokenizer takes
up to 30 s; a saved folder loads in about one) and writes the licence beside them.

    python tests/vocab/fetch.py [DEST]
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
# name -> what it is the tokenizer of
VOCABS = {
    "llama-spm": "Llama 2 / Yi / Mistral v0.1: sentencepiece (BPE with byte fallback), <s> </s>",
    "llama-bpe": "Llama 3: byte-level BPE, 128k vocabulary, <|begin_of_text|> and reserved special tokens",
    "qwen2": "Qwen2: byte-level BPE with ChatML markers and its own chat template",
}
DEST = Path(__file__).resolve().parents[2] / ".cache" / "vocab"


def fetch(dest: Path = DEST) -> None:
    missing = [n for n in VOCABS if not (dest / n / "tokenizer_config.json").is_file()]
    if not missing:
        return
    from transformers import AutoTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST, "-d", tmp],
            check=True,
        )
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                wanted = name in {f"ggml-vocab-{n}.gguf" for n in missing} or (
                    member.name.endswith("vendor/llama.cpp/LICENSE")
                )
                if wanted:
                    member.name = name
                    tar.extract(member, tmp, filter="data")
        (dest / "LICENSE.llama.cpp").write_bytes((Path(tmp) / "LICENSE").read_bytes())
        for name in missing:
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file=f"ggml-vocab-{name}.gguf")
            tok.save_pretrained(dest / name)
            print(f"vocab {name}: {len(tok)} tokens -> {dest / name}")


if __name__ == "__main__":
    fetch(Path(sys.argv[1]) if len(sys.argv) > 1 else DEST)

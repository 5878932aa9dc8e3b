"""Shared fixtures: a tiny random Llama + byte-level tokenizer built in the test (no download), and the embedded model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

VOCAB_DIR = Path(__file__).resolve().parents[1] / ".cache" / "vocab"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


CHATML_SPECIALS = {"eos_token": "<|im_end|>", "pad_token": "<|pad|>", "additional_special_tokens": ["<|im_start|>"]}


def make_tokenizer(chat_template: str | None = None, special_tokens: dict | None = None):
    """Byte-level tokenizer, one token per byte (exact round trip for any text) plus ChatML (or the given) specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens(special_tokens or CHATML_SPECIALS)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_model_dir(
    path: Path, chat_template: str | None = None, seed: int = 0, special_tokens: dict | None = None
) -> Path:
    """Save a tiny random LlamaForCausalLM (2 layers, hidden 32) and its tokenizer into ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(chat_template, special_tokens)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_VOCAB_TOKENIZERS: dict = {}


def vocab_tokenizer(name: str, template: str | None = None):
    """A real tokenizer (``llama-spm``, ``llama-bpe``, ``qwen2``) that ``make install`` saved under ``.cache/vocab``
    (tests/vocab/fetch.py), with ``template`` as its chat template (ChatML added where it has none), loaded once per
    session: do not change it. Fails the test, never skips it, when the folder is missing."""
    key = (name, template)
    if key not in _VOCAB_TOKENIZERS:
        from transformers import AutoTokenizer

        from chatlora.template import ensure_chat_template

        path = VOCAB_DIR / name
        if not (path / "tokenizer_config.json").is_file():
            pytest.fail(f"{path} is missing: run `make install` (tests/vocab/fetch.py saves it)", pytrace=False)
        tok = AutoTokenizer.from_pretrained(str(path))
        if template:
            tok.chat_template = template
        ensure_chat_template(tok)
        _VOCAB_TOKENIZERS[key] = tok
    return _VOCAB_TOKENIZERS[key]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny model dir whose tokenizer has no chat template (chatlora falls back to ChatML)."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-chatml"))


@pytest.fixture(scope="session")
def tiny_smol_dir(tmp_path_factory) -> Path:
    """A tiny model dir whose tokenizer has a SmolLM2-style template (default system prompt injected)."""
    return make_model_dir(tmp_path_factory.mktemp("tiny-smol"), chat_template=SMOL_TEMPLATE)


@pytest.fixture
def tokenizer():
    from chatlora.template import ensure_chat_template

    tok = make_tokenizer()
    ensure_chat_template(tok)
    return tok


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """Twelve short alpaca records (a couple of distinct replies) for fast training tests."""
    rows = [
        {"instruction": f"问题{i}", "input": "", "output": "臣妾做不到啊。" if i % 2 else "皇上万福金安。"}
        for i in range(12)
    ]
    return write_jsonl(tmp_path / "tiny.jsonl", rows)


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    """The embedded SmolLM2-135M-Instruct, converted once to safetensors (integration tier)."""
    from chatlora.model import resolve_model

    return resolve_model("embedded")


def edited_tokenizer(tok, edit, specials: list[str], template: str | None):
    """A new fast tokenizer from ``tok``'s tokenizer.json after ``edit(dict)`` changed it, with ``tok``'s BOS/EOS/UNK,
    ``specials`` added as special tokens and ``template`` as its chat template (``tok`` itself is left as it was)."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = json.loads(tok.backend_tokenizer.to_str())
    edit(backend)
    copy = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(backend)),
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        unk_token=tok.unk_token,
    )
    copy.add_special_tokens({"additional_special_tokens": specials})
    copy.chat_template = template
    return copy

"""Sentencepiece vocabularies in GGUF export (llama.cpp's ``llama`` tokenizer model): Yi's shape end to end.

The tokenizer is Llama-2's real sentencepiece vocabulary from llama.cpp's ``ggml-vocab-llama-spm.gguf`` with the
ChatML markers added, as Yi-6B-Chat has it. Each broken export below (scores dropped, a chat marker typed as
text, BOS added twice, the wrong space prefix) must be caught, by the parity check or by llama.cpp itself.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import edited_tokenizer, vocab_tokenizer
from test_export import failed, make_model_dir, set_gguf_field, statuses, train_adapter

from chatlora.export import check_export, export
from chatlora.export.vocab import _space_prefix, _vocab
from chatlora.model import ModelError
from chatlora.template import encode_prompt, render_text

# Llama 2 / Mistral's shape: the template writes BOS itself, [INST] turns, replies end with EOS.
INST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>\\n' + m['content'] + "
    "'\\n<</SYS>>\\n\\n' }}{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def yi_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("yi")
    return train_adapter(tmp, make_model_dir(tmp / "base", vocab_tokenizer("llama-spm")))


@pytest.fixture(scope="module")
def yi_f16(yi_run, tmp_path_factory):
    return export(yi_run, tmp_path_factory.mktemp("x") / "f16", quant="f16", samples=3, max_new_tokens=10)


def _gguf(result) -> Path:
    return result.files[0]


def _array(path: Path, key: str) -> list:
    return list(gguf.GGUFReader(path).fields[key].contents())


def _edit_array(path: Path, key: str, edit) -> None:
    """Change elements of a metadata array in place (same byte size), as a broken exporter would have written them."""
    reader = gguf.GGUFReader(path, "r+")
    field = reader.fields[key]
    for k, index in enumerate(field.data):
        part = field.parts[index]
        part[...] = edit(k, part.copy())
    reader.data.flush()


def _copy(result, tmp_path: Path) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(result.output_dir, out)
    return out


def test_yi_like_export_passes_with_a_sentencepiece_vocabulary(yi_f16):
    """Guards against sentencepiece exports being refused or written as byte-level BPE: Yi's shape must pass."""
    assert yi_f16.passed, statuses(yi_f16.checks)
    meta = gguf.GGUFReader(_gguf(yi_f16)).fields
    assert meta["tokenizer.ggml.model"].contents() == "llama"
    assert meta["tokenizer.ggml.add_space_prefix"].contents() is False
    assert "tokenizer.ggml.merges" not in meta  # llama.cpp ranks sentencepiece pieces by score
    tok = vocab_tokenizer("llama-spm")
    types = _array(_gguf(yi_f16), "tokenizer.ggml.token_type")
    for marker in ("<|im_start|>", "<|im_end|>", "<s>", "</s>"):
        assert types[tok.convert_tokens_to_ids(marker)] == gguf.TokenType.CONTROL, marker
    assert types[tok.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
    assert types[tok.unk_token_id] == gguf.TokenType.UNKNOWN


def test_llama_cpp_tokenizes_the_export_like_training(yi_f16):
    """Guards against a vocabulary llama.cpp reads differently from transformers: llama.cpp itself must turn each
    rendered chat prompt into the training ids (markers whole, no space after them, spaces and newlines as
    trained)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the test extra")
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    tok = vocab_tokenizer("llama-spm")
    llm = llama_cpp.Llama(str(_gguf(yi_f16)), vocab_only=True, verbose=False)
    for text in ("你是谁？", "Hello  world,\n\n  spaces\ttabs 3.14", " leading space", "emoji 🦙", "a\n b\n  c"):
        conv = [{"role": "system", "content": "你是甄嬛 " + text}, {"role": "user", "content": text}]
        rendered = render_text(conv, tok, add_generation_prompt=True)
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == encode_prompt(conv, tok), text


def test_scores_are_required(yi_f16, tmp_path):
    """Guards against writing a sentencepiece vocabulary without its scores (llama.cpp merges by score)."""
    out = _copy(yi_f16, tmp_path)
    _edit_array(out / _gguf(yi_f16).name, "tokenizer.ggml.scores", lambda k, p: 0)
    bad = failed(check_export(out, samples=2, max_new_tokens=4))
    assert "tokenizer" in bad and "tokenize differently" in bad["tokenizer"]


def test_chat_marker_typed_as_text_is_caught(yi_f16, tmp_path):
    """Guards against typing a chat marker NORMAL: runtimes would spell <|im_start|> out as text pieces."""
    out = _copy(yi_f16, tmp_path)
    marker = vocab_tokenizer("llama-spm").convert_tokens_to_ids("<|im_start|>")
    _edit_array(
        out / _gguf(yi_f16).name,
        "tokenizer.ggml.token_type",
        lambda k, p: gguf.TokenType.NORMAL if k == marker else p,
    )
    bad = failed(check_export(out, samples=2, max_new_tokens=4))
    assert "tokenizer" in bad and "BOS once" in bad


def test_bos_added_twice_is_caught(tmp_path):
    """Guards against add_bos_token=True on a template that writes BOS itself (the double-BOS bug llama.cpp warns
    about); f32 so that only BOS can fail."""
    tok = vocab_tokenizer("llama-spm", INST_TEMPLATE)
    run = train_adapter(tmp_path, make_model_dir(tmp_path / "base", tok))
    result = export(run, tmp_path / "x", quant="f32", samples=2, max_new_tokens=4)
    assert result.passed, statuses(result.checks)
    path = _gguf(result)
    set_gguf_field(path, "tokenizer.ggml.add_bos_token", lambda value: True)
    bad = failed(check_export(result.output_dir, samples=2, max_new_tokens=4))
    assert "2 BOS tokens" in bad["BOS once"]


def test_space_prefix_follows_training():
    """Guards against a space after chat markers that training never had, and against dropping one it had."""
    spm = vocab_tokenizer("llama-spm")  # Metaspace "first": a space at the very start only
    assert _space_prefix(spm) is False
    legacy = _with_backend(spm, lambda b: b.update(pre_tokenizer=None, normalizer=_LEGACY_NORMALIZER))
    marker = legacy.convert_tokens_to_ids("<|im_end|>")
    after = legacy("<|im_end|>a", add_special_tokens=False)["input_ids"]
    assert after[0] == marker and legacy.convert_ids_to_tokens(after[1]).startswith(
        "\u2581"
    )  # a space after markers too
    assert _space_prefix(legacy) is True


def test_wrong_space_prefix_breaks_llama_cpp(yi_f16, tmp_path):
    """Guards against add_space_prefix=True for a tokenizer that adds no space after markers: llama.cpp would read
    every turn's role as ' user' (the parity check's transformers reload cannot see this flag; llama.cpp can)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is part of the test extra")
    out = _copy(yi_f16, tmp_path)
    path = out / _gguf(yi_f16).name
    set_gguf_field(path, "tokenizer.ggml.add_space_prefix", lambda value: True)
    tok = vocab_tokenizer("llama-spm")
    conv = [{"role": "user", "content": "你是谁？"}]
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    got = llm.tokenize(render_text(conv, tok, add_generation_prompt=True).encode(), add_bos=False, special=True)
    assert got != encode_prompt(conv, tok)


_LEGACY_NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ],
}


def _with_backend(tok, edit):
    """A copy of ``tok`` (Yi's shape: ChatML markers) whose tokenizer.json was edited by ``edit(dict)``."""
    return edited_tokenizer(tok, edit, ["<|im_start|>", "<|im_end|>"], tok.chat_template)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda b: b["model"].update(byte_fallback=False, ignore_merges=False) or b.update(decoder=None),
            "byte fallback",
        ),
        (lambda b: b.update(pre_tokenizer={**b["pre_tokenizer"], "split": True}), "splits text before BPE"),
        (lambda b: b.update(normalizer={"type": "Lowercase"}), r"normalizes text \(Lowercase\)"),
    ],
)
def test_unsupported_sentencepiece_shapes_are_refused(edit, message):
    """Guards against writing a tokenizer llama.cpp would tokenize differently without saying so."""
    tok = _with_backend(vocab_tokenizer("llama-spm"), edit)
    with pytest.raises(ModelError, match=message):
        _vocab(tok, len(tok))


def test_scores_rank_pieces_like_the_merges():
    """Guards against scores out of merge order: a piece made by an earlier merge must score higher."""
    tok = vocab_tokenizer("llama-spm")
    vocab = _vocab(tok, len(tok))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    made = [tok.convert_tokens_to_ids("".join(m if isinstance(m, list) else m.split(" "))) for m in merges[:2000]]
    scores = np.array([vocab.scores[i] for i in dict.fromkeys(made)])
    assert (np.diff(scores) < 0).all()

"""The tokenizer as llama.cpp reads it: vocabulary, token types, merges, special ids."""

from __future__ import annotations

import json

import gguf

from ..model import ModelError
from ..template import (
    end_of_turn,
)


def _split_patterns() -> dict[str, str]:
    """llama.cpp pre-tokenizer names whose split regex transformers knows, so a reload reproduces them."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # an older transformers: only the regex-free byte-level kinds are recognised
        return {}
    return {
        name: GGUF_PRE_TOKENIZER_SPLITS[name] for name in ("qwen2", "llama-bpe") if name in GGUF_PRE_TOKENIZER_SPLITS
    }


def _pre_tokenizer(backend: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the way this tokenizer splits text before BPE.

    Derived from the tokenizer the adapter was trained with, so llama.cpp splits text the way training did.
    """
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    if kinds and kinds[-1] == "ByteLevel" and last.get("add_prefix_space"):
        raise ModelError("the tokenizer adds a prefix space (ByteLevel add_prefix_space), which llama.cpp does not")
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and last.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, known in _split_patterns().items():
            if regex == known and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
                return name
    raise ModelError(
        f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp equivalent that "
        "chatlora knows (GPT-2, SmolLM, Qwen2 or Llama-3 style), so llama.cpp would split text differently"
    )


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    """Tokens, token types, merges and pre-tokenizer name of a byte-level BPE tokenizer, llama.cpp's ``gpt2``."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    decoder = backend.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ModelError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2, SmolLM); this one is "
            f"{model.get('type')} with a {decoder.get('type')} decoder (sentencepiece tokenizers are not supported)"
        )
    normalizer = backend.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise ModelError(f"the tokenizer normalizes text ({normalizer.get('type')}), which llama.cpp does not")
    pre = _pre_tokenizer(backend)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise ModelError("the BPE tokenizer has no merges; llama.cpp needs them")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ModelError(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, merges, pre


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    tokens, types, merges, pre = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _, eot = end_of_turn(tokenizer)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    # The stop token is the one the model was trained to end its turns with; runtimes that stop only at EOS stop.
    writer.add_eos_token_id(eot)
    writer.add_eot_token_id(eot)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    # Training tokenizes the rendered template without special tokens: a runtime must add none either, or the model
    # sees a BOS it never saw in training (twice, when the template writes it too).
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

"""The tokenizer as llama.cpp reads it: vocabulary, token types, merges, special ids."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import gguf

from ..errors import ModelError
from ..template import control_tokens, end_of_turn, takes_system


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


@dataclass(frozen=True)
class _Vocab:
    """A tokenizer as llama.cpp stores it.

    ``model`` is llama.cpp's ``tokenizer.ggml.model``: ``gpt2`` (byte-level BPE, with ``merges``) or ``llama``
    (sentencepiece BPE with byte fallback, with ``scores`` and ``add_space_prefix``).
    """

    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    add_space_prefix: bool = False


def _vocab(tokenizer, vocab_size: int) -> _Vocab:
    """The tokenizer in llama.cpp's terms, refusing what llama.cpp would tokenize differently from training."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    decoder = backend.get("decoder") or {}
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ModelError(f"the tokenizer has token id {max(by_id)} but the model only {vocab_size} embeddings")
    if model.get("type") == "BPE" and decoder.get("type") == "ByteLevel":
        return _byte_level_vocab(tokenizer, backend, by_id, vocab_size)
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece_vocab(tokenizer, backend, by_id, vocab_size)
    raise ModelError(
        "GGUF export writes byte-level BPE tokenizers (Llama 3, Qwen2/3, SmolLM) and sentencepiece BPE tokenizers "
        f"with byte fallback (Llama 2, Yi, Mistral, Gemma); this one is {model.get('type')} "
        f"(byte_fallback={model.get('byte_fallback')}) with a {decoder.get('type')} decoder"
    )


def _merge_list(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _byte_level_vocab(tokenizer, backend: dict, by_id: dict[int, str], vocab_size: int) -> _Vocab:
    """Tokens, token types, merges and pre-tokenizer name of a byte-level BPE tokenizer, llama.cpp's ``gpt2``."""
    normalizer = backend.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise ModelError(f"the tokenizer normalizes text ({normalizer.get('type')}), which llama.cpp does not")
    pre = _pre_tokenizer(backend)
    merges = [" ".join(m) for m in _merge_list(backend["model"])]
    if not merges:
        raise ModelError("the BPE tokenizer has no merges; llama.cpp needs them")
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
    return _Vocab("gpt2", pre, tokens, types, merges=merges)


_SPACE = "\u2581"  # sentencepiece's visible space
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _sentencepiece_vocab(tokenizer, backend: dict, by_id: dict[int, str], vocab_size: int) -> _Vocab:
    """Pieces, scores and token types of a sentencepiece BPE tokenizer, llama.cpp's ``llama`` model.

    llama.cpp merges the adjacent pair whose joined piece scores highest; a Hugging Face tokenizer keeps ranked
    merges instead. A piece's score is minus the rank of the first merge that makes it, so both merge in the same
    order (transformers derives merges from the scores the same way when it reloads the file). Chat markers and
    special tokens are CONTROL, which llama.cpp never splits; added tokens the template does not use are
    USER_DEFINED, pieces ``<0xNN>`` are BYTE and ids without a token UNUSED, as llama.cpp's converter types them.
    """
    _check_sentencepiece_splitting(backend)
    merges = _merge_list(backend["model"])
    if not merges:
        raise ModelError("the sentencepiece tokenizer has no merges; llama.cpp needs its pieces' ranks")
    first_rank: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first_rank.setdefault(left + right, rank)
    added = tokenizer.added_tokens_decoder
    controls = set(control_tokens(tokenizer).values())
    T = gguf.TokenType

    def entry(i: int) -> tuple[str, float, int]:
        piece = by_id.get(i)
        if piece is None:
            return f"[PAD{i}]", -1000.0, T.UNUSED
        if i == tokenizer.unk_token_id:
            return piece, 0.0, T.UNKNOWN
        if i in controls or (i in added and added[i].special):
            return piece, -1000.0, T.CONTROL
        if i in added:
            return piece, -1000.0, T.USER_DEFINED
        if _BYTE_PIECE.fullmatch(piece):
            return piece, 0.0, T.BYTE
        # a piece no merge makes (a single character) is never a merge's result: its score is never read
        return piece, -float(first_rank.get(piece, 0)), T.NORMAL

    tokens, scores, types = (list(column) for column in zip(*map(entry, range(vocab_size)), strict=True))
    return _Vocab("llama", "default", tokens, types, scores=scores, add_space_prefix=_space_prefix(tokenizer))


def _check_sentencepiece_splitting(backend: dict) -> None:
    """llama.cpp's sentencepiece tokenizer writes spaces as the visible space and splits nothing: refuse others."""
    normalizer = backend.get("normalizer") or {}
    steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for step in filter(None, steps):
        replace = step.get("type") == "Replace" and (step.get("pattern") or {}).get("String") == " "
        if not (replace and step.get("content") == _SPACE) and not (
            step.get("type") == "Prepend" and step.get("prepend") == _SPACE
        ):
            raise ModelError(f"the tokenizer normalizes text ({step.get('type')}), which llama.cpp does not")
    pre = backend.get("pre_tokenizer")
    if pre and not (pre.get("type") == "Metaspace" and pre.get("replacement") == _SPACE and not pre.get("split")):
        raise ModelError(
            f"the tokenizer splits text before BPE ({pre.get('type')}, split={pre.get('split')}), which llama.cpp's "
            "sentencepiece tokenizer does not"
        )


def _space_prefix(tokenizer) -> bool:
    """llama.cpp's ``add_space_prefix``: whether text after a chat marker starts with a visible space.

    llama.cpp puts that space at the start of a prompt and after every control token, or nowhere. Tokenizers that
    add it only at the very start (sentencepiece ``legacy=False``, Metaspace ``first``) get none: a chat prompt
    starts with a marker, and what follows each marker is what training saw.
    """
    marker, _ = end_of_turn(tokenizer)

    def first_piece(text: str) -> str:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.convert_ids_to_tokens(ids[1 if text.startswith(marker) else 0])

    after_marker = first_piece(marker + "a").startswith(_SPACE)
    at_start = first_piece("a").startswith(_SPACE)
    if after_marker and not at_start:
        raise ModelError(
            "the tokenizer adds a space after chat markers but not at the start of a text; llama.cpp cannot"
        )
    return after_marker


def _write_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    vocab = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.model == "llama":
        writer.add_token_scores(vocab.scores)
        writer.add_add_space_prefix(vocab.add_space_prefix)
    else:
        writer.add_token_merges(vocab.merges)
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
    writer.add_chat_template(gguf_chat_template(tokenizer))


# Jinja put before a template that has no system turn: a leading system message opens the first user turn, followed
# by a blank line, as chatlora folds it for training (template.render_text). No text between its tags, so it writes
# nothing itself.
_FOLD_SYSTEM = (
    "{% if messages and messages[0]['role'] == 'system' and messages|length > 1 and messages[1]['role'] == 'user' %}"
    "{% set messages = [{'role': 'user', 'content': (messages[0]['content'] ~ '\\n\\n' ~ messages[1]['content']) "
    "if messages[0]['content'] else messages[1]['content']}] + messages[2:] %}{% endif %}"
)


def gguf_chat_template(tokenizer) -> str:
    """The chat template the GGUF carries: training's, and for a template without a system turn (Gemma 2's raises
    on one, Mistral v0.3's writes it into the last user turn only) preceded by the fold training applied, so a
    runtime given a system message renders what the model was trained on."""
    template = tokenizer.chat_template
    return template if takes_system(tokenizer) else _FOLD_SYSTEM + template

"""Masking and prompt rendering, checked token by token on a byte-level tokenizer (one token per byte)."""

from __future__ import annotations

import pytest
from conftest import SMOL_TEMPLATE, make_tokenizer

from chatlora.template import (
    IGNORE_INDEX,
    TemplateError,
    encode_conversation,
    encode_prompt,
    end_of_turn,
    ensure_chat_template,
    render_text,
    with_system,
)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_text(tok, enc) -> str:
    return tok.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])


CONV = [
    {"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛"},
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "家父是大理寺少卿甄远道。"},
    {"role": "user", "content": "皇上驾到！"},
    {"role": "assistant", "content": "皇上万福金安。"},
]


def test_labels_are_exactly_the_replies_and_their_end_of_turn(tokenizer):
    """Guards against training on the prompt, or forgetting <|im_end|> so the model never learns to stop."""
    enc = encode_conversation(CONV[:3], tokenizer)
    prompt = "<|im_start|>system\n现在你要扮演皇帝身边的女人--甄嬛<|im_end|>\n<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n"
    reply = "家父是大理寺少卿甄远道。<|im_end|>"
    expected_ids = ids(tokenizer, prompt) + ids(tokenizer, reply) + ids(tokenizer, "\n")
    assert enc.input_ids == expected_ids
    n_prompt, n_reply = len(ids(tokenizer, prompt)), len(ids(tokenizer, reply))
    assert enc.labels == [IGNORE_INDEX] * n_prompt + ids(tokenizer, reply) + [IGNORE_INDEX]
    assert enc.labels[n_prompt + n_reply - 1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert not enc.truncated


def test_every_assistant_turn_of_a_multi_turn_chat_is_trained(tokenizer):
    """Guards against masking all but the last reply of a multi-turn conversation."""
    enc = encode_conversation(CONV, tokenizer)
    assert trained_text(tokenizer, enc) == "家父是大理寺少卿甄远道。<|im_end|>皇上万福金安。<|im_end|>"
    # position by position: a label is either the input token itself or ignored
    for token, label in zip(enc.input_ids, enc.labels, strict=True):
        assert label in (token, IGNORE_INDEX)


def test_system_prompt_is_never_trained(tokenizer):
    """Guards against a system prompt leaking into the loss."""
    enc = encode_conversation(CONV[:3], tokenizer)
    assert "甄嬛" not in trained_text(tokenizer, enc)


def test_generation_prompt_is_byte_exact_prefix_of_training_text(tokenizer):
    """Guards against the seed tutorial's bug: '\\nassistant\\n ' at inference vs '<|im_start|>assistant\\n' in training."""
    for cut in (2, 4):
        history = CONV[:cut]
        prompt_text = render_text(history, tokenizer, add_generation_prompt=True)
        train_text = render_text(CONV[: cut + 1], tokenizer)
        assert train_text.startswith(prompt_text)
        assert prompt_text.endswith("<|im_start|>assistant\n")
        prompt_ids = encode_prompt(history, tokenizer)
        assert prompt_ids == ids(tokenizer, prompt_text)
        full = encode_conversation(CONV[: cut + 1], tokenizer).input_ids
        assert full[: len(prompt_ids)] == prompt_ids


def test_model_template_with_injected_default_system_prompt():
    """Guards against assuming ChatML: a template that injects its own system prompt must still mask correctly."""
    tok = make_tokenizer(SMOL_TEMPLATE)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    enc = encode_conversation(conv, tok)
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\nYou are a helpful AI assistant<|im_end|>")
    assert trained_text(tok, enc) == "hello<|im_end|>"
    assert encode_prompt(conv[:1], tok) == enc.input_ids[: len(encode_prompt(conv[:1], tok))]


def test_truncation_keeps_whole_turns_and_reports_it(tokenizer):
    """Guards against cutting a reply in half (no end-of-turn) when an earlier whole turn fits."""
    full = encode_conversation(CONV, tokenizer)
    first_turn = encode_conversation(CONV[:3], tokenizer)
    # room for the first exchange (without its trailing newline) but not the second
    limit = len(first_turn.input_ids) + 5
    enc = encode_conversation(CONV, tokenizer, max_length=limit)
    assert enc.truncated
    assert enc.input_ids == full.input_ids[: len(first_turn.input_ids) - 1]
    assert trained_text(tokenizer, enc) == "家父是大理寺少卿甄远道。<|im_end|>"


def test_truncation_cuts_mid_reply_only_when_nothing_whole_fits(tokenizer):
    """Guards against returning an empty example (or one over max_length) when the first reply is too long."""
    enc = encode_conversation(CONV[:3], tokenizer, max_length=50)
    assert enc.truncated and len(enc.input_ids) == 50 == len(enc.labels)
    assert encode_conversation(CONV[:3], tokenizer, max_length=10_000).truncated is False


def test_end_of_turn_detection():
    """Guards against a hard-coded stop id (the seed used eos_token_id=7): it must come from the template."""
    tok = make_tokenizer()
    ensure_chat_template(tok)
    assert end_of_turn(tok) == ("<|im_end|>", tok.convert_tokens_to_ids("<|im_end|>"))


def test_fallback_chatml_adds_missing_special_tokens():
    """Guards against a tokenizer without ChatML tokens splitting '<|im_end|>' into characters."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    ensure_chat_template(tok)
    assert len(ids(tok, "<|im_end|>")) == 1
    assert end_of_turn(tok)[0] == "<|im_end|>"


def test_with_system_prefers_the_data():
    """Guards against the config's system prompt overriding one written in the data."""
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert with_system(conv, "S")[0] == {"role": "system", "content": "S"}
    own = [{"role": "system", "content": "mine"}, *conv]
    assert with_system(own, "S") == own
    assert with_system(conv, None) == conv and with_system(conv, "") == conv


def test_template_that_rewrites_history_is_refused():
    """Guards against silently mis-masking templates whose earlier turns change once more turns are added."""
    tok = make_tokenizer(
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + ('|' if loop.last else ';') }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}<|im_end|>"
    )
    with pytest.raises(TemplateError):
        encode_conversation(CONV[1:3], tok)

"""The Modelfile TEMPLATE, rendered by Go's text/template as Ollama does, must write exactly the training text."""

from __future__ import annotations

import shutil

import pytest
from chat_templates import family_tokenizer
from conftest import SMOL_TEMPLATE, make_tokenizer

from chatlora.export import modelfile_text, ollama_template, parse_modelfile, render_go_template
from chatlora.template import CHATML_TEMPLATE, TemplateError, render_text, with_system

needs_go = pytest.mark.skipif(shutil.which("go") is None, reason="go is not installed (CI installs golang-go)")

# Qwen2.5's shape: a default system prompt when the conversation brings none, ChatML otherwise.
QWEN_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Llama 3's shape: BOS written by the template, header tokens around the role, no newline between turns.
LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '<|im_end|>\n\n' + m['content'] + '<|endoftext|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_end|>\n\n' }}{% endif %}"
)

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"
CONVERSATIONS = [
    [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "臣妾甄嬛。"}],
    [
        {"role": "user", "content": 'Quotes " and \\ backslashes, {{ .Content }} braces,\n\ttabs and 🦙'},
        {"role": "assistant", "content": "  spaces kept  \n"},
        {"role": "user", "content": "第二轮：皇上万福金安"},
        {"role": "assistant", "content": "嗯。"},
    ],
    [
        {"role": "system", "content": "Another system prompt."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
    ],
]


def tokenizer_for(template: str):
    tok = make_tokenizer(template)
    if template == LLAMA3_LIKE:
        tok.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    return tok


@needs_go
@pytest.mark.parametrize("template", [CHATML_TEMPLATE, SMOL_TEMPLATE, QWEN_LIKE, LLAMA3_LIKE])
@pytest.mark.parametrize("system", [SYSTEM, None])
def test_go_renders_the_training_text(template, system):
    """Guards against a Modelfile TEMPLATE that differs from training (LLaMA-Factory #6020), byte for byte."""
    tok = tokenizer_for(template)
    go_template = ollama_template(tok)
    cases, wants = [], []
    for conv in CONVERSATIONS:
        trained = with_system(conv, system)
        prompt = conv[:-1]
        cases += [prompt, conv]  # what Ollama's chat receives; it adds the Modelfile SYSTEM itself
        wants += [render_text(with_system(prompt, system), tok, add_generation_prompt=True), render_text(trained, tok)]
    got = render_go_template(go_template, cases, system)
    assert got == wants


@needs_go
@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral"])
@pytest.mark.parametrize("system", [SYSTEM, None])
def test_go_folds_the_system_prompt_like_training(family, system):
    """Guards against templates without a system turn (Gemma-2 raises on one, Gemma-3 folds it itself, Mistral
    v0.3 writes it into the last user turn only) being refused or rendered without the system prompt: the Go
    TEMPLATE opens the first user turn with it, as training did."""
    tok = family_tokenizer(family)
    go_template = ollama_template(tok)
    convs = [  # these templates trim contents, so the contents here have no edge whitespace
        [{"role": "user", "content": "你是谁？"}, {"role": "assistant", "content": "臣妾甄嬛。"}],
        [
            {"role": "user", "content": 'Quotes " and \\ {{ .Content }}'},
            {"role": "assistant", "content": "嗯。"},
            {"role": "user", "content": "第二轮"},
            {"role": "assistant", "content": "好。"},
        ],
    ]
    cases, wants = [], []
    for conv in convs:
        cases += [conv[:-1], conv]
        wants += [render_text(with_system(conv[:-1], system), tok, add_generation_prompt=True)]
        wants += [render_text(with_system(conv, system), tok)]
    got = render_go_template(go_template, cases, system)
    assert got == wants
    if system:
        assert all(system + "\n\n你是谁？" in text for text in got[:2])


@needs_go
def test_modelfile_round_trip_renders_like_training():
    """Guards against the Modelfile's quoting changing the TEMPLATE or SYSTEM on the way through the file."""
    tok = tokenizer_for(SMOL_TEMPLATE)
    text = modelfile_text("./m.gguf", ollama_template(tok), 'say "hi" \\ {{ x }}', ["<|im_end|>"])
    mf = parse_modelfile(text)
    conv = CONVERSATIONS[1]
    assert render_go_template(mf["TEMPLATE"], [conv], mf["SYSTEM"]) == [
        render_text(with_system(conv, 'say "hi" \\ {{ x }}'), tok)
    ]


def test_position_dependent_template_is_refused():
    """Guards against writing a TEMPLATE that only matches training on short conversations (here: from turn 4 on)."""
    late = (
        "{% for m in messages %}{% if loop.index > 3 %}{{ '[late]' }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="cannot write the chat template as an Ollama TEMPLATE: it is not a fixed"):
        ollama_template(make_tokenizer(late))


@needs_go
def test_go_template_errors_are_reported():
    """Guards against a Go parse error passing silently as an empty rendering."""
    with pytest.raises(TemplateError, match="Go could not render"):
        render_go_template("{{ if }}", [[{"role": "user", "content": "x"}]])


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral", "qwen"])
def test_gguf_chat_template_renders_a_system_prompt_as_training_did(family):
    """Guards against a GGUF chat template that raises on a system message (Gemma 2) or drops it from a conversation
    ending on a reply (Mistral v0.3), where training folded it into the first user turn: a runtime given the trained
    system prompt must render the text the model was trained on."""
    from chatlora.export.vocab import gguf_chat_template

    tok = family_tokenizer(family)
    template = gguf_chat_template(tok)
    for system in (SYSTEM, ""):
        conv = [{"role": "system", "content": system}, *CONVERSATIONS[1][:3]]
        want = render_text(conv, tok, add_generation_prompt=True)
        assert (
            tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, chat_template=template) == want
        )
        whole = [{"role": "system", "content": system}, *CONVERSATIONS[0]]
        assert tok.apply_chat_template(whole, tokenize=False, chat_template=template) == render_text(whole, tok)

"""Chat templates that are not plain ChatML (tests/chat_templates.py: Qwen2.5, Llama-3.1, Gemma-2/3, Mistral v0.3
shapes), token by token, and end to end: train, chat, generate, eval and serve on a tiny scripted model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chat_templates import FAMILIES, QWEN_DEFAULT_SYSTEM, REPLY_LEAD, family_tokenizer, make_scripted_model_dir
from conftest import write_jsonl

from chatlora.config import DEFAULT_SYSTEM_PROMPT, TrainConfig
from chatlora.data import DataError, load_records
from chatlora.template import (
    IGNORE_INDEX,
    TemplateError,
    encode_conversation,
    encode_prompt,
    end_of_turn,
    render_text,
    stop_token_ids,
    takes_system,
    with_system,
)

HUANHUAN = DEFAULT_SYSTEM_PROMPT
CONV = [
    {"role": "user", "content": "你是谁？"},
    {"role": "assistant", "content": "家父是大理寺少卿甄远道。"},
    {"role": "user", "content": "皇上驾到！"},
    {"role": "assistant", "content": "皇上万福金安。"},
]
HI = [{"role": "user", "content": "hello there"}]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def trained_text(tok, enc) -> str:
    return tok.decode([i for i, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])


def eot_of(family: str) -> str:
    return FAMILIES[family][2]


# ---------------------------------------------------------------- masking and stop tokens, token by token


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("system", [None, HUANHUAN])
def test_only_replies_and_their_end_of_turn_are_trained(family, system):
    """Guards against cutting the trained span at EOS instead of the template's end-of-turn token (Gemma's
    '<end_of_turn>\\n' would train the newline after it), and against training a default or folded system prompt."""
    tok = family_tokenizer(family)
    eot, lead = eot_of(family), REPLY_LEAD.get(family, "")
    conv = with_system(CONV, system)
    enc = encode_conversation(conv, tok)
    assert trained_text(tok, enc) == f"{lead}家父是大理寺少卿甄远道。{eot}{lead}皇上万福金安。{eot}"
    for token, label in zip(enc.input_ids, enc.labels, strict=True):
        assert label in (token, IGNORE_INDEX)
    assert enc.labels.count(tok.convert_tokens_to_ids(eot)) == 2  # the token itself, not its characters
    # every prompt is a token-exact prefix of the training sequence, through the same code
    for cut in (1, 3):
        prompt = encode_prompt(conv[: cut + (system is not None)], tok)
        assert enc.input_ids[: len(prompt)] == prompt
        assert tok.decode(prompt) == render_text(conv[: cut + (system is not None)], tok, add_generation_prompt=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("system", [None, HUANHUAN])
def test_train_on_user_labels_the_user_turns_text_and_no_other_prompt_token(family, system):
    """Guards against `train_on_user` labelling the system prompt or the template's own tokens, against it changing
    the tokens (training must stay token-exact with inference prompts), and against it skipping a user turn."""
    tok = family_tokenizer(family)
    conv = with_system(CONV, system)
    plain, user = encode_conversation(conv, tok), encode_conversation(conv, tok, label_user=True)
    assert user.input_ids == plain.input_ids
    eot, lead = eot_of(family), REPLY_LEAD.get(family, "")
    want = f"你是谁？{lead}家父是大理寺少卿甄远道。{eot}皇上驾到！{lead}皇上万福金安。{eot}"
    assert trained_text(tok, user) == want
    for token, label in zip(user.input_ids, user.labels, strict=True):
        assert label in (token, IGNORE_INDEX)
    # a user turn whose text also occurs in the system prompt: its own span is labelled, not the prompt's
    short = encode_conversation(with_system(CONV, "你是谁？" + HUANHUAN), tok, label_user=True)
    assert trained_text(tok, short) == want
    system_end = next(k for k in range(len(short.input_ids)) if HUANHUAN in tok.decode(short.input_ids[:k]))
    assert all(label == IGNORE_INDEX for label in short.labels[:system_end])


@pytest.mark.parametrize("family", FAMILIES)
def test_long_conversations_mask_every_turn(family):
    """Guards against the linear-time window rendering mislocating replies on a template that writes a default
    system block, BOS, trims contents or folds the system prompt (turns past the window must still be exact)."""
    tok = family_tokenizer(family)
    conv = [{"role": "system", "content": HUANHUAN}]
    for k in range(7):
        conv += [{"role": "user", "content": f" 问{k}\n"}, {"role": "assistant", "content": f"答{k}"}]
    enc = encode_conversation(conv, tok)
    eot, lead = eot_of(family), REPLY_LEAD.get(family, "")
    assert trained_text(tok, enc) == "".join(f"{lead}答{k}{eot}" for k in range(7))
    assert tok.decode(enc.input_ids) == render_text(conv, tok)


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_and_stop_tokens_come_from_the_template(family):
    """Guards against stopping at EOS only: Llama-3's turns end with <|eot_id|> while EOS is <|end_of_text|>, and
    Gemma's with <end_of_turn> while EOS is <eos>; a model would talk on past its turn."""
    tok = family_tokenizer(family)
    eot = eot_of(family)
    eot_id = tok.convert_tokens_to_ids(eot)
    assert end_of_turn(tok) == (eot, eot_id)
    assert stop_token_ids(tok) == list(dict.fromkeys([eot_id, tok.eos_token_id]))
    if family not in ("qwen", "mistral"):
        assert eot_id != tok.eos_token_id


# ---------------------------------------------------------------- (a) a template with its own default system prompt


def test_default_system_prompt_is_written_alike_in_training_and_inference():
    """Guards against rendering the no-system case two ways (e.g. an empty system message at training, none at
    inference): Qwen2.5 then trains on 'system\\n' and is prompted with its default 'You are Qwen...'."""
    tok = family_tokenizer("qwen")
    trained = encode_conversation(with_system(CONV[:2], None), tok)
    prompt = encode_prompt(with_system(CONV[:1], None), tok)
    assert trained.input_ids[: len(prompt)] == prompt
    assert tok.decode(prompt).startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert with_system(CONV, "") == CONV  # '' means no system prompt: the template's default, not an empty one


def test_a_given_system_prompt_replaces_the_default():
    """Guards against a template's default system prompt being written next to (not instead of) Huanhuan's."""
    tok = family_tokenizer("qwen")
    text = tok.decode(encode_prompt(with_system(CONV[:1], HUANHUAN), tok))
    assert text.startswith(f"<|im_start|>system\n{HUANHUAN}<|im_end|>\n<|im_start|>user\n你是谁？")
    assert QWEN_DEFAULT_SYSTEM not in text


# ---------------------------------------------------------------- (b) tool calling: plain chats only


def test_function_calling_records_are_refused_by_file_and_line(tmp_path):
    """Guards against silently dropping 'tools'/'tool_calls' (the model would learn replies to calls it never saw)."""
    plain = {"messages": [*CONV[:2]]}
    tools = {
        "messages": [
            {"role": "user", "content": "天气如何？"},
            {"role": "assistant", "content": "我查一下。", "tool_calls": [{"function": {"name": "w"}}]},
            {"role": "tool", "content": "晴"},
            {"role": "assistant", "content": "晴。"},
        ],
        "tools": [{"type": "function", "function": {"name": "w"}}],
    }
    path = write_jsonl(tmp_path / "tools.jsonl", [plain, tools])
    with pytest.raises(DataError) as e:
        load_records(path)
    assert e.value.problems == [
        f'{path}:2: record has "tools": function calling is not supported: chatlora trains plain '
        "system/user/assistant conversations (drop it)",
        f'{path}:2: "messages"[1] has "tool_calls": function calling is not supported: chatlora trains plain '
        "system/user/assistant conversations (drop it)",
        f'{path}:2: "messages"[2].role is "tool": expected one of "system", "user", "assistant" (function calling '
        "is not supported)",
    ]
    assert len(load_records(write_jsonl(tmp_path / "plain.jsonl", [plain]))) == 1


# ---------------------------------------------------------------- (c) a template without a system role


def test_system_prompt_is_folded_into_the_first_user_turn_when_the_template_has_no_system_role():
    """Guards against Gemma-2's 'System role not supported' stopping every run that has a system prompt (the
    default), or a template that drops the system message silently training without the character."""
    gemma2, gemma3 = family_tokenizer("gemma2"), family_tokenizer("gemma3")
    assert not takes_system(gemma2) and takes_system(gemma3) and takes_system(family_tokenizer("llama3"))
    conv = with_system(CONV, HUANHUAN)
    # folded as Gemma-3's own template folds it
    assert render_text(conv, gemma2) == render_text(conv, gemma3)
    assert render_text(conv, gemma2).startswith(f"<bos><start_of_turn>user\n{HUANHUAN}\n\n你是谁？<end_of_turn>\n")
    dropping = family_tokenizer("gemma2")
    dropping.chat_template = dropping.chat_template.replace(
        "{{ raise_exception('System role not supported') }}", ""
    ).replace("{% for message in messages %}", "{% for message in messages if message['role'] != 'system' %}")
    assert "System role" not in dropping.chat_template and "!= 'system'" in dropping.chat_template
    assert not takes_system(dropping)
    assert HUANHUAN in render_text(conv, dropping)


def test_system_prompt_written_only_into_a_final_user_turn_is_folded_into_the_first():
    """Guards against taking Mistral v0.3's template at its word: it writes the system prompt into the last user
    turn only, so never in a training conversation (which ends on a reply), while every prompt would have it."""
    tok = family_tokenizer("mistral")
    assert not takes_system(tok)
    conv = with_system(CONV, HUANHUAN)
    assert render_text(conv, tok) == f"<s>[INST] {HUANHUAN}\n\n你是谁？[/INST] 家父是大理寺少卿甄远道。</s>" + (
        "[INST] 皇上驾到！[/INST] 皇上万福金安。</s>"
    )
    enc = encode_conversation(conv, tok)
    prompt = encode_prompt(conv[:3], tok)
    assert enc.input_ids[: len(prompt)] == prompt and HUANHUAN in tok.decode(prompt)


def test_template_refusals_are_template_errors():
    """Guards against jinja's raise_exception escaping as a traceback (or a 500 from the server) instead of the
    project's TemplateError: Gemma requires user/model turns to alternate."""
    tok = family_tokenizer("gemma2")
    with pytest.raises(TemplateError, match="conversation user/user: Conversation roles must alternate"):
        encode_prompt([CONV[0], CONV[0]], tok)
    with pytest.raises(TemplateError, match="no system role"):
        render_text([{"role": "system", "content": HUANHUAN}], tok)


# ---------------------------------------------------------------- end to end on a scripted model per template

E2E = ["qwen", "llama3", "gemma2"]
ROWS = [{"instruction": f"问题{i}", "input": "", "output": "hi"} for i in range(12)]


def _cfg(model_dir: Path, data: Path, out: Path, system_prompt: str) -> TrainConfig:
    return TrainConfig(
        model=str(model_dir),
        data=str(data),
        output_dir=str(out),
        max_steps=1,
        batch_size=4,
        val_size=4,
        logging_steps=1,
        eval_steps=0,
        save_steps=100,
        lr=1e-3,
        lora_dropout=0.0,
        lora_targets=["q_proj", "v_proj"],  # outputs stay the scripted ones (see make_scripted_model_dir)
        system_prompt=system_prompt,
    )


@pytest.fixture(scope="module", params=E2E)
def run(request, tmp_path_factory):
    """(family, model dir, data, trained adapter dir): Huanhuan's system prompt except for Qwen, which trains with
    none so that its own default is the one used everywhere."""
    from chatlora.training.train import train

    family = request.param
    tmp = tmp_path_factory.mktemp(f"tpl-{family}")
    model_dir = make_scripted_model_dir(tmp / "model", family)
    data = write_jsonl(tmp / "d.jsonl", ROWS)
    result = train(_cfg(model_dir, data, tmp / "out", "" if family == "qwen" else HUANHUAN))
    return family, model_dir, data, result.output_dir


def test_training_masks_the_template_and_records_its_end_of_turn(run, tmp_path):
    """Guards against train encoding records another way than the template module (the system prompt of the run
    card, the end-of-turn token recorded for export/serve) for non-ChatML templates."""
    from chatlora.training.train import prepare_run

    family, model_dir, data, out = run
    card = json.loads((out / "chatlora.json").read_text())
    assert card["template"]["end_of_turn"] == eot_of(family)
    assert card["template"]["system_prompt"] == (None if family == "qwen" else HUANHUAN)
    prepared = prepare_run(_cfg(model_dir, data, tmp_path / "o", card["template"]["system_prompt"] or ""))
    tok = prepared.tokenizer
    for ex in prepared.train_ex + prepared.val_ex:
        labels = [t for t in ex["labels"] if t != IGNORE_INDEX]
        assert tok.decode(labels) == "hi" + eot_of(family)
        text = tok.decode(ex["input_ids"])
        assert (QWEN_DEFAULT_SYSTEM in text) == (family == "qwen") and (HUANHUAN in text) == (family != "qwen")


def test_chat_and_stream_stop_at_the_end_of_turn(run):
    """Guards against generation that stops at EOS only: the scripted model says 'hi', its end-of-turn token, then
    'xxx...' (Llama-3/Gemma would reply 'hixxxxxx', finish_reason 'length')."""
    from chatlora.inference.infer import ChatModel, SamplingConfig

    family, _, _, out = run
    chat = ChatModel.load(adapter=out, device="cpu")
    sampling = SamplingConfig(max_new_tokens=8, temperature=0)
    reply = chat.generate(HI, sampling)
    assert (reply.text, reply.finish_reason, reply.completion_tokens) == ("hi", "stop", 3)
    stream = chat.stream(HI, sampling)
    assert "".join(stream) == "hi" and stream.reply == reply
    # the prompt is the training one: the run's system prompt (or, for Qwen, the template's default)
    assert chat.prompt_ids(HI) == encode_prompt(
        with_system(HI, None if family == "qwen" else HUANHUAN), chat.tokenizer
    )


def test_generate_file_stops_at_the_end_of_turn(run, tmp_path):
    """Guards against batched generation (left padding, several prompts) running past the end-of-turn token."""
    from chatlora.cli import main

    _, _, _, out = run
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}, {"messages": CONV[:3]}])
    replies = tmp_path / "r.jsonl"
    argv = ["generate", "--adapter", str(out), "--input", str(prompts), "--output", str(replies)]
    assert main([*argv, "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in replies.read_text().splitlines()]
    assert [(r["reply"], r["finish_reason"], r["usage"]["completion_tokens"]) for r in rows] == [("hi", "stop", 3)] * 2


def test_eval_scores_replies_and_their_end_of_turn_only(run):
    """Guards against eval's loss counting the template's text after the end-of-turn token or the prompt (each held
    out reply is 'h', 'i', end-of-turn: 3 tokens, all predicted well by the scripted model) and against its replies
    not stopping."""
    from chatlora.cli import main

    _, _, _, out = run
    assert main(["eval", "--adapter", str(out), "--max-new-tokens", "8", "--examples", "1", "--device", "cpu"]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for system in ("base", "tuned"):
        assert metrics["loss"][system]["tokens"] == 4 * 3
        assert metrics["loss"][system]["loss"] < 0.1
        assert metrics["replies"][system]["stop_rate"] == 1.0


def test_serve_stops_at_the_end_of_turn_streaming_or_not(run):
    """Guards against the server's stop tokens, streamed deltas or finish_reason differing from chat's for a
    template whose end-of-turn is not EOS, and against a different prompt than training's."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from serving import BackgroundServer

    from chatlora.serve import create_app, load_models

    family, _, _, out = run
    models = load_models({"tuned": out}, device="cpu")
    with BackgroundServer(create_app(models)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tuned", messages=HI, temperature=0, max_tokens=8)
        assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("hi", "stop")
        assert r.usage.completion_tokens == 3
        system = None if family == "qwen" else HUANHUAN  # the run's; Qwen's default written by the template
        assert r.usage.prompt_tokens == len(
            encode_prompt(with_system(HI, system), models.models["tuned"].chat.tokenizer)
        )
        chunks = list(
            client.chat.completions.create(model="tuned", messages=HI, temperature=0, max_tokens=8, stream=True)
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hi"
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="tuned", messages=HI, max_tokens=8, tools=[{"type": "function", "function": {"name": "w"}}]
            )
        assert e.value.body["param"] == "tools"
        if family == "gemma2":  # the template's refusal is the client's 400, not a server error
            with pytest.raises(openai.BadRequestError, match="alternate"):
                client.chat.completions.create(model="tuned", messages=HI + HI, max_tokens=8)


def test_a_record_the_template_refuses_is_named_by_file_and_line(tmp_path):
    """Guards against a template refusal in training data (two user turns in a row, which Gemma forbids) ending
    in a traceback instead of one line naming the record."""
    from chatlora.training.train import prepare_run

    model_dir = make_scripted_model_dir(tmp_path / "model", "gemma2")
    good = [
        {"messages": [{"role": "user", "content": f"问{i}"}, {"role": "assistant", "content": "hi"}]} for i in range(9)
    ]
    bad = {"messages": [CONV[0], CONV[0], CONV[1]]}
    data = write_jsonl(tmp_path / "d.jsonl", [*good, bad])
    with pytest.raises(DataError) as e:
        prepare_run(_cfg(model_dir, data, tmp_path / "o", HUANHUAN))
    assert len(e.value.problems) == 1
    assert e.value.problems[0].startswith(f"{data}:10: the chat template refuses the conversation user/user/")

"""Batched generation (issue 12): rows of one batch behave as if each were generated alone."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import write_jsonl
from serving import make_adapter

from chatlora.errors import ConfigError
from chatlora.inference.infer import BASE, ChatModel, SamplingConfig, generate_rows

GREEDY = SamplingConfig(max_new_tokens=10, temperature=0)
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hello there, how are you today? " * 3}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c d e"}],
]


@pytest.fixture(scope="module")
def chats(tiny_model_dir, tmp_path_factory) -> dict[str, ChatModel]:
    """Three views of one network: the base and two random adapters (as the server holds them)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chatlora.model import load_tokenizer

    root = tmp_path_factory.mktemp("batch-adapters")
    dirs = {name: make_adapter(tiny_model_dir, root / name, seed) for name, seed in (("alpha", 1), ("beta", 2))}
    net = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(dirs["alpha"]), adapter_name="alpha"
    )
    net.load_adapter(str(dirs["beta"]), adapter_name="beta")
    tok = load_tokenizer(str(tiny_model_dir))
    tok.padding_side = "left"
    return {
        name: ChatModel(net, tok, None, name, adapter=adapter)
        for name, adapter in [("base", BASE), *((n, n) for n in dirs)]
    }


def _rows(chats, sampling):
    return [
        chats[name].row(chats[name].prompt_ids(conv), sampling)
        for name in ("alpha", "base", "beta")
        for conv in CONVERSATIONS
    ]


def test_mixed_batch_equals_each_request_alone(chats):
    """Bug: a batch mixed lengths and adapters wrongly (padding seen as tokens, positions off by the padding, a row
    run with another row's adapter), so a reply depended on its batch company instead of being the one it gets alone."""
    alone = []
    for row in _rows(chats, GREEDY):
        generate_rows(chats["base"].model, [row], chats["base"].tokenizer.pad_token_id)
        alone.append(row._tokens)
    together = _rows(chats, GREEDY)
    generate_rows(chats["base"].model, together, chats["base"].tokenizer.pad_token_id)
    assert len({len(r.prompt_ids) for r in together}) == 3, "the prompts should differ in length"
    assert len({tuple(t) for t in alone}) >= 6, "the three models should answer differently"
    assert [r._tokens for r in together] == alone
    assert all(r.reply.completion_tokens == len(t) for r, t in zip(together, alone, strict=True))


def test_greedy_rows_match_plain_generate(chats):
    """Bug: the per-row sampler changed greedy decoding (e.g. the repetition penalty applied twice or not at all)."""
    import torch

    chat = chats["beta"]
    ids = chat.prompt_ids(CONVERSATIONS[1])
    x = torch.tensor([ids])

    def plain(penalty: float) -> list[int]:
        out = chat.model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=24,
            do_sample=False,
            repetition_penalty=penalty,
            eos_token_id=chat.stop_ids,
            adapter_names=["beta"],
        )
        return out[0, len(ids) :].tolist()

    want = plain(3.0)
    assert want != plain(1.0), "the penalty should change this reply"
    row = chat.row(ids, SamplingConfig(max_new_tokens=24, temperature=0, repetition_penalty=3.0))
    chat.run([row])
    assert row._tokens == [t for t in want if t not in chat.stop_ids]


def test_the_penalty_never_sees_left_padding(chats):
    """Bug: the repetition penalty of a left-padded row also hit the pad token, which a row alone never holds."""
    import torch

    from chatlora.inference.infer import _RowSampler

    chat = chats["base"]
    pad = chat.tokenizer.pad_token_id
    short, long_ = [5, 6], [7, 8, 9, 10]
    rows = [chat.row(p, SamplingConfig(temperature=0, repetition_penalty=2.0)) for p in (short, long_)]
    scores = torch.randn(2, len(chat.tokenizer))
    scores[:, pad] = 3.0
    batched = _RowSampler(rows, 4, torch.device("cpu"))(torch.tensor([[pad, pad, *short], long_]), scores.clone())
    alone = _RowSampler(rows[:1], 2, torch.device("cpu"))(torch.tensor([short]), scores[:1].clone())
    assert torch.equal(batched[0], alone[0])
    assert batched[0, pad] == 3.0 and batched[0, 5] != scores[0, 5]


def test_a_seed_gives_the_same_reply_in_any_batch(chats):
    """Bug: seeded rows drew from one shared generator, so a seeded reply changed with what else was batched."""
    seeded = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=7)
    chat = chats["alpha"]
    ids = chat.prompt_ids(CONVERSATIONS[0])
    alone = chat.run([chat.row(ids, seeded)])[0].text
    others = [chats["beta"].row(chats["beta"].prompt_ids(c), SamplingConfig(temperature=0.9)) for c in CONVERSATIONS]
    together = chat.run([*others, chat.row(ids, seeded)])[-1].text
    assert together == alone
    other_seed = chat.run([chat.row(ids, SamplingConfig(**{**seeded.__dict__, "seed": 8}))])[0].text
    assert other_seed != alone


class _CancelAfter(threading.Event):
    """A cancel flag that turns on at its n-th look: the row is cancelled mid-generation."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.looks, self.n = 0, n

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.n


def test_rows_end_on_their_own(chats):
    """Bug: a row's reply limit, stop string or cancellation ended the whole batch, or was ignored."""
    chat = chats["base"]
    ids = chat.prompt_ids(CONVERSATIONS[0])
    full = chat.run([chat.row(ids, SamplingConfig(max_new_tokens=12, temperature=0))])[0]
    stop = full.text[3:5]
    cancel = threading.Event()
    texts: list[str] = []
    rows = [
        chat.row(ids, SamplingConfig(max_new_tokens=3, temperature=0)),
        chat.row(ids, SamplingConfig(max_new_tokens=12, temperature=0), stop=[stop], on_text=texts.append),
        chat.row(ids, SamplingConfig(max_new_tokens=12, temperature=0), cancel=cancel),
        chat.row(ids, SamplingConfig(max_new_tokens=12, temperature=0)),
    ]
    cancel.set()
    later = _CancelAfter(3)  # cancelled at the third token
    rows.append(chat.row(ids, SamplingConfig(max_new_tokens=12, temperature=0), cancel=later))
    short, stopped, cancelled, whole, cut = chat.run(rows)
    assert (cut.finish_reason, cut.completion_tokens) == ("cancelled", 2)
    assert (short.finish_reason, short.completion_tokens) == ("length", 3)
    assert full.text.startswith(short.text)
    assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.index(stop)]
    assert "".join(texts) == stopped.text
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 0
    assert whole == full


@pytest.fixture
def engine(chats):
    """The network's engine (shared by its three views), its batch size given back afterwards."""
    engine = chats["base"].engine
    before = engine.max_batch
    yield engine
    engine.max_batch = before


def test_engine_rows_joining_and_leaving_equal_each_request_alone(chats, engine, monkeypatch):
    """Bug: a row that joined running rows, took a freed slot, was moved to another slot or had its columns shifted
    got keys and values, positions, a mask or an adapter that were not its own, so its reply depended on when it
    came instead of being the one it gets alone."""
    import chatlora.inference.engine as engine_module

    monkeypatch.setattr(engine_module, "SHIFT_COLUMNS", 1)  # shift out unused columns at every join
    alone = []
    for row in _rows(chats, GREEDY):
        generate_rows(chats["base"].model, [row], chats["base"].tokenizer.pad_token_id)
        alone.append(row._tokens)
    rows = _rows(chats, GREEDY)
    for i, r in enumerate(rows):
        r.sampling = SamplingConfig(max_new_tokens=3 + 2 * (i % 4), temperature=0)  # rows end at different steps
    engine.max_batch = 4
    prefills = engine.prefills
    chats["base"].run(rows, batch_size=4)
    assert engine.prefills - prefills >= 3, "rows should have joined running ones"
    assert [r._tokens for r in rows] == [t[: r.sampling.max_new_tokens] for r, t in zip(rows, alone, strict=True)]


class _EagerGraph:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the captured step function."""

    def __init__(self, step) -> None:
        self.step = step

    def replay(self):
        return self.step()


def test_graph_buckets_decode_like_the_eager_step(chats, engine, monkeypatch):
    """Bug: the decode step of the CUDA-graph path (static buffers padded to a bucket of rows and columns, empty
    slots, one write column, adapter masks from a buffer) fed a row another row's token, position, mask or adapter.
    The capture itself needs CUDA; here a replay runs the same step function eagerly."""
    alone = []
    for row in _rows(chats, GREEDY):
        generate_rows(chats["base"].model, [row], chats["base"].tokenizer.pad_token_id)
        alone.append(row._tokens)
    captured: list[tuple[int, int]] = []

    def capture(self, b, cols):
        captured.append((b, cols))
        self._graph_set[(b, cols)] = _EagerGraph(self._graph_step(b, cols))
        return self._graph_set[(b, cols)]

    monkeypatch.setattr(type(engine), "_capture", capture)
    monkeypatch.setattr(engine, "graphs", True)
    engine.max_batch = 6
    rows = _rows(chats, GREEDY)
    chats["base"].run(rows, batch_size=6)
    assert [r._tokens for r in rows] == alone
    assert any(b > 1 for b, _ in captured) and len(set(captured)) >= 2, captured
    engine._graph_set.clear()


def test_engine_lets_a_waiting_row_join_before_the_longest_row_ends(chats, engine):
    """Bug: a batch ran until its longest row ended while requests waited (no joining at token boundaries)."""
    chat = chats["alpha"]
    ids = chat.prompt_ids(CONVERSATIONS[0])
    events: list[str] = []
    rows = [
        chat.row(ids, SamplingConfig(max_new_tokens=40, temperature=0), on_done=lambda r: events.append("long")),
        chat.row(ids, SamplingConfig(max_new_tokens=2, temperature=0), on_done=lambda r: events.append("short")),
        chat.row(ids, SamplingConfig(max_new_tokens=2, temperature=0), on_done=lambda r: events.append("late")),
    ]
    engine.max_batch = 2
    with engine.gate:  # the model is busy: all three wait, two get slots, the third waits for one
        for row in rows:
            engine.submit(row)
        time.sleep(0.1)
        assert engine.waiting() == 3
    for row in rows:
        assert row.over.wait(60)
    assert rows[0].reply.completion_tokens == 40, "the long row should run to its limit"
    assert events == ["short", "late", "long"]


def test_engine_failure_reaches_each_row_and_the_engine_lives_on(chats, engine, monkeypatch):
    """Bug: an exception in the engine's thread killed it silently: the rows (and every later request) hung."""
    chat = chats["alpha"]
    ids = chat.prompt_ids(CONVERSATIONS[0])
    errors: list[BaseException] = []

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    with monkeypatch.context() as m:
        m.setattr(engine, "_forward", broken)
        with pytest.raises(RuntimeError, match="simulated"):
            chat.run([chat.row(ids, GREEDY, on_error=errors.append)])
    assert [str(e) for e in errors] == ["out of memory (simulated)"]
    assert chat.run([chat.row(ids, GREEDY)])[0].completion_tokens > 0


def test_generate_many_refuses_a_zero_batch_and_defaults_by_device(chats):
    """Bug: a batch size of 0 passed silently as "use the default" (``batch_size or default``) instead of an error."""
    from chatlora.errors import ConfigError

    chat = chats["alpha"]
    with pytest.raises(ConfigError, match="batch_size must be > 0"):
        chat.generate_many(CONVERSATIONS, GREEDY, batch_size=0, desc=None)
    assert chat.batch_size == 8  # the CPU's default; 64 on a GPU


def test_sampling_ranges_are_one_definition(tmp_path, capsys):
    """Bug: the CLI and the server checked sampling values against different ranges."""
    from chatlora.cli import main

    assert SamplingConfig(top_p=0).problems() == [("top_p", "must be > 0 and <= 1")]
    assert SamplingConfig(temperature=2.5).problems() == [("temperature", "must be >= 0 and <= 2")]
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        SamplingConfig(repetition_penalty=0).check()
    assert main(["chat", "--model", str(tmp_path), "--prompt", "x", "--temperature", "2.5"]) == 2
    assert "--temperature must be >= 0 and <= 2, got 2.5" in capsys.readouterr().err
    from chatlora.serve.schema import _ChatBody

    limits = _ChatBody.model_json_schema()["properties"]["temperature"]["anyOf"][0]
    assert (limits["minimum"], limits["maximum"]) == (0, 2)


def test_generate_file_writes_each_prompt_with_its_own_system(chats, tmp_path):
    """Bug: batching by length mixed system prompts up, or rows came back out of input order."""
    from chatlora.inference.infer import ReplyFile, generate_file, read_prompts

    chat = chats["beta"]
    rows = [
        {"prompt": c[-1]["content"], **({"system": f"S{i}"} if i % 2 else {})} for i, c in enumerate(CONVERSATIONS)
    ]
    prompts = read_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    with ReplyFile(tmp_path / "out.jsonl") as out:
        generate_file(chat, prompts, out, GREEDY, batch_size=2, system="default")
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [g["prompt"] for g in got] == [r["prompt"] for r in rows]
    for row, g in zip(rows, got, strict=True):
        want = chat.generate([{"role": "user", "content": row["prompt"]}], GREEDY, system=row.get("system", "default"))
        assert g["reply"] == want.text


def test_adapter_dir_has_what_vllm_needs(tmp_path, tiny_model_dir):
    """Bug: a run's adapter dir lacked what `vllm serve BASE --enable-lora --lora-modules NAME=DIR` reads (PEFT
    config with rank and targets, safetensors weights), or the tokenizer with the training chat template that the
    README's recipe passes as --chat-template."""
    from chatlora.config import TrainConfig
    from chatlora.training.train import train

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "input": "", "output": "ok"} for i in range(8)])
    cfg = TrainConfig(
        model=str(tiny_model_dir),
        data=str(data),
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        batch_size=4,
        val_size=2,
        eval_steps=0,
        save_steps=100,
        logging_steps=1,
    )
    out = Path(train(cfg).output_dir)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] > 0 and config["target_modules"]
    assert not config.get("modules_to_save"), "vLLM's LoRA serves low-rank weights only"
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    template = out / "chat_template.jinja"
    if not template.exists():
        template_text = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    else:
        template_text = template.read_text()
    assert "<|im_start|>" in template_text and "add_generation_prompt" in template_text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_a_dora_adapter_is_served_beside_lora_and_base(tiny_model_dir, tmp_path):
    """Bug: a DoRA adapter (`chatlora train --dora`) made every batch it joined fail, since PEFT cannot mix DoRA
    rows into a batch (`adapter_names=`); its rows must run apart, with the adapter active, and reply as alone."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chatlora.model import load_tokenizer

    net = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
        str(make_adapter(tiny_model_dir, tmp_path / "alpha", 1)),
        adapter_name="alpha",
    )
    net.load_adapter(str(make_adapter(tiny_model_dir, tmp_path / "gamma", 3, dora=True)), adapter_name="gamma")
    tok = load_tokenizer(str(tiny_model_dir))
    greedy = SamplingConfig(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    views = {
        n: ChatModel(net, tok, None, n, adapter=a) for n, a in (("base", BASE), ("alpha", "alpha"), ("gamma", "gamma"))
    }
    ids = views["base"].prompt_ids(CONVERSATIONS[0])

    def plain(adapter: str | None) -> list[int]:
        net.set_adapter(adapter or "alpha")
        x = torch.tensor([ids])
        kw = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False)
        if adapter is None:
            with net.disable_adapter():
                return net.generate(**kw)[0, len(ids) :].tolist()
        return net.generate(**kw)[0, len(ids) :].tolist()

    want = {"base": plain(None), "alpha": plain("alpha"), "gamma": plain("gamma")}
    assert len({tuple(w) for w in want.values()}) == 3
    net.set_adapter("alpha")
    rows = [views[n].row(ids, greedy) for n in ("gamma", "alpha", "base", "gamma")]
    views["base"].run(rows)
    assert [r._tokens for r in rows] == [want[n] for n in ("gamma", "alpha", "base", "gamma")]
    assert net.active_adapter == "alpha"


def test_generate_many_takes_an_adapter_choice_per_conversation(chats):
    """Bug: a per-row use_adapter list was ignored or misaligned after the length sort (a base row answered by the
    adapter), so mixing base and tuned rows in one call (the persona drift) changed whose reply is whose."""
    chat = chats["alpha"]
    tuned = chat.generate_many(CONVERSATIONS, GREEDY, use_adapter=True, desc=None)
    base = chat.generate_many(CONVERSATIONS, GREEDY, use_adapter=False, desc=None)
    assert [r.text for r in tuned] != [r.text for r in base], "base and adapter should answer differently"
    mixed = chat.generate_many(CONVERSATIONS * 2, GREEDY, use_adapter=[True] * 3 + [False] * 3, desc=None)
    assert [r.text for r in mixed] == [r.text for r in tuned + base]
    with pytest.raises(ConfigError, match="use_adapter"):
        chat.generate_many(CONVERSATIONS, GREEDY, use_adapter=[True], desc=None)


def test_persona_drift_feeds_each_system_its_own_replies(chats):
    """Bug: base and tuned drift turns, generated in one call, swapped systems or histories (the base conversation
    continued with the tuned replies), so the drift plot compared the wrong models."""
    from chatlora.config import PersonaConfig
    from chatlora.eval.persona import _drift_phase, resolve

    chat = chats["alpha"]
    cfg = PersonaConfig(markers=["x"], drift_conversations=2, drift_turns=3, max_new_tokens=10)
    records = [conv[:1] for conv in CONVERSATIONS]
    persona = resolve(cfg, "Huanhuan", [])
    _, rows = _drift_phase(chat, persona, records, cfg, GREEDY, None, 8)
    for name, adapter in (("base", False), ("tuned", True)):
        for c in range(2):
            mine = [r for r in rows if r["system"] == name and r["conversation"] == c]
            history: list[dict] = []
            for r in mine:
                history.append({"role": "user", "content": r["user"]})
                want = chat.generate_many([list(history)], GREEDY, use_adapter=adapter, desc=None)[0].text
                assert r["reply"] == want, (name, c, r["turn"])
                history.append({"role": "assistant", "content": r["reply"]})
    assert [r["system"] for r in rows] == ["base"] * 6 + ["tuned"] * 6


@pytest.mark.parametrize("context", [None, 160])
def test_drift_keeping_keys_and_values_gives_the_same_replies(chats, context):
    """Bug: a drift turn that reuses its rows' kept keys and values, instead of re-encoding each conversation,
    misplaced them in the left-padded batch (a cached token off by one, padding on the wrong side) and the greedy
    replies changed; also once the oldest exchange is dropped to fit drift_context (160: the kept cache must be
    cut), and with base and tuned rows in batches smaller than a turn."""
    from chatlora.config import PersonaConfig
    from chatlora.eval.persona import _drift_phase, resolve

    chat = chats["alpha"]
    cfg = PersonaConfig(markers=["x"], drift_conversations=3, drift_turns=4, max_new_tokens=10, drift_context=context)
    records = [conv[:1] for conv in CONVERSATIONS]
    persona = resolve(cfg, "Huanhuan", [])
    kept, kept_rows = _drift_phase(chat, persona, records, cfg, GREEDY, None, 4, reuse=True)
    plain, plain_rows = _drift_phase(chat, persona, records, cfg, GREEDY, None, 4, reuse=False)
    assert kept_rows == plain_rows  # token-exact: the same text and finish of every reply, turn by turn
    assert kept.tokens["reused"] > 0 and plain.tokens["reused"] == 0
    assert kept.tokens["prompt"] == plain.tokens["prompt"]


def test_drift_turn_encodes_its_new_tokens_not_the_whole_conversation(chats):
    """Bug: each drift turn re-encoded the whole conversation, so 20 turns were quadratic (drift took 665 s of a
    14-minute persona section on the 2-core CPU). With the keys and values kept, a turn's prefill is at most its
    user turn, the template around it and the last reply's final token, counted at the model's forward."""
    from chatlora.config import PersonaConfig
    from chatlora.eval.persona import _drift_phase, resolve

    chat = chats["alpha"]
    tok = chat.tokenizer
    # replies of ASCII letters: their text encodes back to the very tokens generated (random bytes would not)
    allowed = {tok.convert_tokens_to_ids(c) for c in "abcdefghij"} | set(chat.stop_ids)
    sampling = SamplingConfig(
        max_new_tokens=8, temperature=0, logit_bias={i: -1e4 for i in range(len(tok)) if i not in allowed}
    )
    cfg = PersonaConfig(markers=["x"], drift_conversations=3, drift_turns=5, max_new_tokens=8)
    records = [conv[:1] for conv in CONVERSATIONS]
    persona = resolve(cfg, "Huanhuan", [])
    prefills: list[int] = []

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:  # decode steps feed one token
            prefills.append(ids.shape[1])

    hook = chat.model.get_base_model().register_forward_pre_hook(count, with_kwargs=True)
    try:
        _, rows = _drift_phase(chat, persona, records, cfg, sampling, None, 8, reuse=True)
        kept = list(prefills)
        prefills.clear()
        _drift_phase(chat, persona, records, cfg, sampling, None, 8, reuse=False)
        whole = list(prefills)
    finally:
        hook.remove()
    assert len(kept) == cfg.drift_turns <= len(whole)  # one batch, one prefill per turn (the engine may split whole)
    template = len(chat.prompt_ids([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}] * 2))
    template -= len(chat.prompt_ids([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]))
    longest_user = max(len(tok.encode(r["user"], add_special_tokens=False)) for r in rows)
    assert max(kept[1:]) <= longest_user + template + 1, (kept, whole)
    assert max(whole) > longest_user + template + 1  # the counter sees the growth
    assert all("\ufffd" not in r["reply"] for r in rows)


def test_a_captured_step_must_match_the_eager_one_to_be_used():
    """Guards against a CUDA graph that computes something else (a stale buffer, a cache write at the wrong column)
    answering requests: the engine compares its first replay with the eager step and decodes eagerly when they
    differ. Same top tokens and values within rounding pass; another top token or a far-off value does not."""
    import torch

    from chatlora.inference.engine import _same_step

    eager = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.5, 0.2]])
    assert _same_step(eager, eager + 1e-4)
    assert not _same_step(eager, eager.flip(-1))  # another top token
    off = eager.clone()
    off[1, 2] = 2.9  # same top token, one value far off
    assert not _same_step(eager, off)

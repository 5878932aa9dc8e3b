"""The OpenAI-compatible server against a live uvicorn on 127.0.0.1, with a tiny random model and two adapters."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from serving import BackgroundServer, make_adapter  # noqa: E402

from chatlora.inference.infer import ChatModel, SamplingConfig  # noqa: E402
from chatlora.model import ModelError  # noqa: E402
from chatlora.serve import create_app, load_models, parse_adapters  # noqa: E402

HI = [{"role": "user", "content": "hello there"}]
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "alpha": make_adapter(tiny_model_dir, root / "alpha", 1),
        "beta": make_adapter(tiny_model_dir, root / "beta", 2),
    }


@pytest.fixture(scope="module")
def models(tiny_model_dir, adapters):
    return load_models(adapters, device="cpu")


@pytest.fixture(scope="module")
def server(models):
    with BackgroundServer(create_app(models, max_queue=4)) as srv:
        yield srv


@pytest.fixture(scope="module")
def locked_server(models):
    """An API-key server with room for one request (a batch of one, no queue), logging prompts."""
    with BackgroundServer(create_app(models, api_key="s3cret", max_queue=0, max_batch=1, log_prompts=True)) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def base_name(models) -> str:
    return next(iter(models.models))


def reference(model_dir: Path, adapter: Path | None, messages, max_new_tokens=8) -> str:
    chat = ChatModel.load(adapter=adapter, model=None if adapter else str(model_dir), device="cpu")
    return chat.generate(messages, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0)).text


def test_models_lists_base_and_each_adapter(client, models):
    """Bug: /v1/models forgot the base model or an adapter, so clients could not pick it."""
    ids = [m.id for m in client.models.list().data]
    assert ids == [base_name(models), "alpha", "beta"]
    assert base_name(models).startswith("tiny")


def test_each_model_answers_like_a_standalone_load(client, models, tiny_model_dir, adapters):
    """Bug: set_adapter was not applied per request (or the base ran with an adapter on), so replies came from
    the wrong weights; each served model must equal loading that adapter (or the base) alone."""
    want = {base_name(models): reference(tiny_model_dir, None, HI)}
    want.update({name: reference(tiny_model_dir, d, HI) for name, d in adapters.items()})
    assert len(set(want.values())) == 3, "the test adapters should change the replies"
    for name in ["beta", base_name(models), "alpha", "beta"]:  # switch back and forth
        r = client.chat.completions.create(model=name, messages=HI, **GREEDY)
        assert r.choices[0].message.content == want[name], name
        assert r.choices[0].finish_reason == "length"
        assert r.object == "chat.completion" and r.model == name


def test_usage_counts_the_training_template_prompt(client, models):
    """Bug: the server rendered prompts with its own template (not the training one) or miscounted usage."""
    chat = models.models["alpha"].chat
    r = client.chat.completions.create(model="alpha", messages=HI, **GREEDY)
    assert r.usage.prompt_tokens == len(chat.prompt_ids(HI))
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_stream_matches_non_stream(client):
    """Bug: streamed deltas lost or duplicated text, or the final chunk had no finish_reason / usage."""
    full = client.chat.completions.create(model="alpha", messages=HI, temperature=0, max_tokens=24)
    chunks = list(
        client.chat.completions.create(
            model="alpha",
            messages=HI,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_raw_sse_wire_format(server):
    """Bug: events were not `data: {json}` blocks ending with `data: [DONE]`, which breaks non-Python clients."""
    body = {"model": "beta", "messages": HI, "stream": True, **GREEDY}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert len({p["id"] for p in payloads}) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_reply_and_reports_stop(client, stream):
    """Bug: a `stop` string was ignored, leaked into the reply, or finish_reason said `length`."""
    full = client.chat.completions.create(model="alpha", messages=HI, temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    stop = text[6:9]
    assert len(stop) == 3 and text.find(stop) >= 0
    kwargs = {"model": "alpha", "messages": HI, "temperature": 0, "max_tokens": 30, "stop": [stop, "\u2603never"]}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        got = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        r = client.chat.completions.create(**kwargs)
        got, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert got == text[: text.find(stop)]
    assert finish == "stop"


def test_seed_makes_sampling_reproducible(client):
    """Bug: `seed` was accepted but not applied, so sampled replies could not be reproduced."""
    kw = {
        "model": "beta",
        "messages": HI,
        "temperature": 1.0,
        "max_tokens": 12,
        "extra_body": {"top_k": 0, "repetition_penalty": 1.0},
    }
    a, b, c = (client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (7, 7, 8))
    assert a == b
    assert a != c


def _bad(server, body, status: int, param=None, code=None, raw: bytes | None = None):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=raw if raw is not None else json.dumps(body),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


LONG = "x" * 1100  # the tiny model's context is 1024 tokens (one token per byte)


@pytest.mark.parametrize(
    "body,status,param,code",
    [
        ({"messages": HI}, 400, "model", None),
        ({"model": "nope", "messages": HI}, 404, "model", "model_not_found"),
        ({"model": "../../../etc/passwd", "messages": HI}, 404, "model", "model_not_found"),
        ({"model": "alpha", "messages": []}, 400, "messages", None),
        ({"model": "alpha", "messages": "hi"}, 400, "messages", None),
        ({"model": "alpha", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
        ({"model": "alpha", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
        ({"model": "alpha", "messages": ["hi"]}, 400, "messages[0]", None),
        ({"model": "alpha", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", None),
        (
            {"model": "alpha", "messages": [{"role": "user", "content": LONG}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
        ({"model": "alpha", "messages": HI, "max_tokens": 0}, 400, "max_tokens", None),
        ({"model": "alpha", "messages": HI, "max_tokens": -3}, 400, "max_tokens", None),
        ({"model": "alpha", "messages": HI, "max_tokens": 10**9}, 400, "max_tokens", None),
        ({"model": "alpha", "messages": HI, "max_tokens": "5"}, 400, "max_tokens", None),
        ({"model": "alpha", "messages": HI, "temperature": 2.5}, 400, "temperature", None),
        ({"model": "alpha", "messages": HI, "temperature": -0.1}, 400, "temperature", None),
        ({"model": "alpha", "messages": HI, "temperature": "hot"}, 400, "temperature", None),
        ({"model": "alpha", "messages": HI, "top_p": 0}, 400, "top_p", None),
        ({"model": "alpha", "messages": HI, "n": 2}, 400, "n", None),
        ({"model": "alpha", "messages": HI, "stop": 5}, 400, "stop", None),
        ({"model": "alpha", "messages": HI, "stream": "yes"}, 400, "stream", None),
        ([1, 2], 400, None, None),
    ],
)
def test_bad_requests_get_openai_shaped_errors(server, body, status, param, code):
    """Bug: bad input crashed the handler (500), hung, or answered in a shape OpenAI clients cannot parse."""
    _bad(server, body, status, param, code)


def test_logit_bias_steers_its_own_row_only(client, server, models):
    """Bug: `logit_bias` was silently ignored; a bias must also stay with its row when requests share a batch."""
    chat = models.models["alpha"].chat
    z = chat.tokenizer.encode("z", add_special_tokens=False)[0]
    kw = {"model": "alpha", "messages": HI, "temperature": 0, "max_tokens": 4}
    forced = client.chat.completions.create(**kw, logit_bias={str(z): 100})
    assert forced.choices[0].message.content == "zzzz"
    plain = client.chat.completions.create(**kw).choices[0].message.content
    assert plain != "zzzz"
    ids = chat.prompt_ids(HI)
    greedy = SamplingConfig(max_new_tokens=4, temperature=0)
    biased = SamplingConfig(max_new_tokens=4, temperature=0, logit_bias={z: 100})
    together = chat.run([chat.row(ids, biased), chat.row(ids, greedy)])
    assert [r.text for r in together] == ["zzzz", plain]
    for key in ("-1", "abc", str(len(chat.tokenizer))):
        _bad(server, {**kw, "logit_bias": {key: 1}}, 400, "logit_bias")
    _bad(server, {**kw, "logit_bias": {str(z): 101}}, 400)


def test_presence_and_frequency_penalties_are_honoured_per_row(client, models):
    """Bug: presence_penalty / frequency_penalty were refused (or, before that, silently ignored). A greedy reply
    that repeats a token must stop repeating it under a frequency penalty large enough, in its own row only."""
    chat = models.models["alpha"].chat
    z = chat.tokenizer.encode("z", add_special_tokens=False)[0]
    ids = chat.prompt_ids(HI)
    forced = SamplingConfig(max_new_tokens=4, temperature=0, logit_bias={z: 3})
    assert chat.run([chat.row(ids, forced)])[0].text == "zzzz"  # the bias alone: z every time
    damped = SamplingConfig(
        max_new_tokens=4, temperature=0, logit_bias={z: 3}, frequency_penalty=2, presence_penalty=2
    )
    together = chat.run([chat.row(ids, damped), chat.row(ids, forced)])
    assert together[0].text.startswith("z") and together[0].text != "zzzz" and together[1].text == "zzzz"
    kw = {"model": "alpha", "messages": HI, "temperature": 0, "max_tokens": 4, "logit_bias": {str(z): 3}}
    over_http = client.chat.completions.create(**kw, frequency_penalty=2, presence_penalty=2)
    assert over_http.choices[0].message.content == together[0].text


@pytest.mark.parametrize(
    "field,value",
    [
        ("logprobs", True),
        ("top_logprobs", 3),
        ("response_format", {"type": "json_object"}),
        ("tool_choice", "required"),
        ("functions", [{"name": "f"}]),
        ("function_call", {"name": "f"}),
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("web_search_options", {}),
    ],
)
def test_sampling_fields_chatlora_does_not_do_get_400_naming_them(server, field, value):
    """Bug: the request model ignored unknown fields, so presence_penalty, logprobs, response_format, ... were
    silently dropped and the client got a reply made without them."""
    err = _bad(server, {"model": "alpha", "messages": HI, field: value}, 400, field, "unsupported_parameter")
    assert field in err["message"]


def test_sampling_fields_at_their_defaults_are_accepted(server):
    """Bug: refusing a field even at its default (presence_penalty: 0, logprobs: false) breaks clients that always
    send every field."""
    defaults = {
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logprobs": False,
        "top_logprobs": 0,
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "functions": [],
        "function_call": "auto",
        "modalities": ["text"],
        "audio": None,
        "logit_bias": {"5": 0},
        "user": "someone",
    }
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "alpha", "messages": HI, "max_tokens": 1, **defaults}
    )
    assert r.status_code == 200, r.text


def test_malformed_json_is_400(server):
    """Bug: a body that is not JSON raised inside the handler and came back as a 500."""
    _bad(server, None, 400, code="invalid_json", raw=b'{"model": "alpha", "messages": [')
    _bad(server, None, 400, code="invalid_json", raw=b"\xff\xfe")


def test_server_still_healthy_after_bad_input(server):
    """Bug: an error path leaked a queue slot, so the server filled up after a few bad requests."""
    for _ in range(6):
        _bad(server, {"model": "alpha", "messages": HI, "temperature": 9}, 400)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["in_flight"] == 0


def test_openai_client_raises_typed_errors(client):
    """Bug: error bodies were not OpenAI-shaped, so the official client raised generic errors without messages."""
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=HI)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="alpha", messages=HI, temperature=3)


def test_health_and_page(server):
    """Bug: the liveness probe or the web page was not served."""
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="model"' in page.text and "/v1/chat/completions" in page.text


def test_api_key_required_on_v1(locked_server):
    """Bug: with --api-key set, /v1 endpoints still answered requests without (or with a wrong) bearer token."""
    url = locked_server.url
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic s3cret"},
    ):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nothing")):
            r = httpx.request(method, url + path, headers=headers, json={"model": "alpha", "messages": HI})
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").status_code == 200
    good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
    assert good.chat.completions.create(model="alpha", messages=HI, **GREEDY).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="s3cre", max_retries=0).models.list()


def test_full_queue_answers_503_with_retry_after(locked_server):
    """Bug: with the model busy and the queue full, new requests hung or crashed instead of a quick 503."""
    app_state = locked_server.server.config.app.state
    admission = app_state.admission
    auth = {"Authorization": "Bearer s3cret"}
    body = {"model": "alpha", "messages": HI, **GREEDY}
    results: list[int] = []
    admission.gate.acquire()  # the model is busy
    try:
        worker = threading.Thread(
            target=lambda: results.append(
                httpx.post(locked_server.url + "/v1/chat/completions", json=body, headers=auth, timeout=60).status_code
            )
        )
        worker.start()
        deadline = time.monotonic() + 10
        while admission.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        r = httpx.post(locked_server.url + "/v1/chat/completions", json=body, headers=auth, timeout=10)
        assert time.monotonic() - started < 5
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "server_overloaded"
    finally:
        admission.gate.release()
    worker.join(timeout=60)
    assert results == [200]
    assert admission.in_flight == 0


def test_disconnect_mid_stream_cancels_generation(server):
    """Bug: a client that hung up mid-stream kept the model generating to max_tokens, holding its slot."""
    admission = server.server.config.app.state.admission
    cancelled = admission.cancelled
    body = {"model": "alpha", "messages": HI, "stream": True, "temperature": 0, "max_tokens": 1000}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # keep a reference: a dropped iterator closes the response
        assert next(lines).startswith("data: ")
        # Random bytes rarely decode as UTF-8, so the streamer may hold text back: wait for the model instead.
        time.sleep(0.3)
        assert admission.in_flight == 1
    hung_up = time.monotonic()
    while (admission.in_flight or admission.cancelled == cancelled) and time.monotonic() < hung_up + 10:
        time.sleep(0.02)
    # 1000 tokens take ~10x longer than this on the tiny model: the generation was stopped, not finished.
    assert time.monotonic() - hung_up < 5
    assert admission.in_flight == 0
    assert admission.cancelled == cancelled + 1
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "alpha", "messages": HI, **GREEDY}, timeout=30)
    assert r.status_code == 200


def test_concurrent_requests_are_queued_not_mixed(client, models, tiny_model_dir, adapters):
    """Bug: concurrent requests for different adapters raced on set_adapter and got each other's weights."""
    want = {
        "alpha": reference(tiny_model_dir, adapters["alpha"], HI),
        "beta": reference(tiny_model_dir, adapters["beta"], HI),
    }
    got: dict[int, tuple[str, str]] = {}

    def ask(i: int) -> None:
        name = "alpha" if i % 2 else "beta"
        got[i] = (name, client.chat.completions.create(model=name, messages=HI, **GREEDY).choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(5)]  # 1 running + 4 queued = capacity
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(got) == 5
    assert all(text == want[name] for name, text in got.values())


def _log_lines(caplog, needle: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [r.getMessage() for r in caplog.records if r.name == "chatlora.serve" and needle in r.getMessage()]
        if lines:
            return lines
        time.sleep(0.02)
    return []


def test_one_log_line_per_request_without_prompt_text(server, caplog):
    """Bug: request logs leaked prompt text (private data) when --log-prompts was off, or logged nothing."""
    caplog.set_level(logging.INFO, logger="chatlora.serve")
    secret = "my-password-is-hunter2"
    httpx.post(
        server.url + "/v1/chat/completions",
        timeout=30,
        json={"model": "beta", "messages": [{"role": "user", "content": secret}], **GREEDY, "max_tokens": 7},
    )
    # an earlier test's request (8 tokens) may log late on a loaded machine; this one is the only 7-token request
    lines = [line for line in _log_lines(caplog, "POST /v1/chat/completions 200") if "completion_tokens=8" not in line]
    assert len(lines) == 1
    assert "model=beta" in lines[0] and "completion_tokens=7" in lines[0]
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_log_prompts_includes_prompt_text(locked_server, caplog):
    """Bug: --log-prompts had no effect."""
    caplog.set_level(logging.INFO, logger="chatlora.serve")
    httpx.post(
        locked_server.url + "/v1/chat/completions",
        headers={"Authorization": "Bearer s3cret"},
        timeout=30,
        json={"model": "beta", "messages": [{"role": "user", "content": "log-me-please"}], **GREEDY},
    )
    assert any("log-me-please" in line for line in _log_lines(caplog, "POST /v1/chat/completions"))


def test_parse_adapters(tmp_path):
    """Bug: NAME=DIR flags were split wrong, or a bad name could be given."""
    d = tmp_path / "run1"
    d.mkdir()
    assert parse_adapters([str(d), f"hero={d}"]) == {"run1": d, "hero": d}
    with pytest.raises(ValueError, match="used twice"):
        parse_adapters([str(d), str(d)])
    with pytest.raises(ValueError, match="name"):
        parse_adapters([f"bad name={d}"])


def test_load_models_rejects_a_dir_without_adapter(tmp_path):
    """Bug: a wrong --adapter path failed deep inside PEFT with an unreadable traceback."""
    with pytest.raises(ModelError, match="adapter_config.json"):
        load_models({"x": tmp_path}, device="cpu")


def test_cli_serve_needs_a_model(capsys):
    """Bug: `chatlora serve` with neither --adapter nor --model started loading something or crashed."""
    from chatlora.cli import build_parser, main

    assert main(["serve"]) == 2
    assert "--adapter" in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--adapter", "a=/x", "--adapter", "/y", "--port", "0"])
    assert args.adapter == ["a=/x", "/y"] and args.host == "127.0.0.1" and args.port == 0


def test_unknown_routes_and_methods_are_openai_shaped(server):
    """Bug: 404/405 came back as FastAPI's {"detail": ...}, which OpenAI clients cannot show."""
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", "/v1/chat/completions", 405)):
        r = httpx.request(method, server.url + path)
        assert r.status_code == status
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server.url + "/v1/models/alpha")
    assert r.json()["id"] == "alpha"
    assert httpx.get(server.url + "/v1/models/..%2F..%2Fetc").status_code == 404


def test_stream_sends_piled_up_deltas_as_one_chunk():
    """Bug: a stream that fell behind (many streams at once) sent every token as its own event, so a busy server
    spent its time writing chunks instead of catching up; the text and the end must come out unchanged."""
    import asyncio
    from types import SimpleNamespace

    from chatlora.inference.infer import Reply
    from chatlora.serve.app import _sse

    async def collect() -> list[dict]:
        job = SimpleNamespace(
            id="chatcmpl-x",
            created=0,
            req=SimpleNamespace(model=SimpleNamespace(name="m"), include_usage=False),
            events=asyncio.Queue(),
            cancel=threading.Event(),
        )
        for piece in ("臣", "妾", "在"):
            job.events.put_nowait(("delta", piece))
        job.events.put_nowait(("done", Reply("臣妾在", "stop", 3, 4)))
        ended = []
        chunks = [c async for c in _sse(job, ended.append)]
        assert chunks[-1] == "data: [DONE]\n\n" and ended[0].text == "臣妾在" and not job.cancel.is_set()
        return [json.loads(c[len("data: ") :]) for c in chunks[:-1]]

    events = asyncio.run(collect())
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "臣妾在"}, {}]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"

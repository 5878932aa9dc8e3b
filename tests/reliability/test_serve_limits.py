"""Server limits and hostile input (issue 11): a live uvicorn on 127.0.0.1 with a tiny random model, plus raw
sockets for what well-behaved HTTP clients never send (unfinished headers, huge declared bodies, idle connections).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serving import BackgroundServer  # noqa: E402

from chatlora.serve import create_app, load_models  # noqa: E402

HI = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return load_models(model=str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def name(models) -> str:
    return next(iter(models.models))


@pytest.fixture(scope="module")
def server(models):
    """Every limit at its default."""
    with BackgroundServer(create_app(models)) as srv:
        yield srv


def post(url: str, body=None, raw: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    return httpx.post(
        url + "/v1/chat/completions",
        content=raw if raw is not None else json.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
        timeout=timeout,
    )


def assert_openai_error(r, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def port_of(srv) -> int:
    return int(srv.url.rsplit(":", 1)[1])


def raw_request(srv, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it or a full response arrived."""
    with socket.create_connection(("127.0.0.1", port_of(srv)), timeout=timeout) as s:
        s.sendall(data)
        return read_response(s)


def read_response(s: socket.socket) -> bytes:
    buf = b""
    while True:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep:
            length = next(
                (
                    int(v)
                    for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
                    if k.lower() == b"content-length"
                ),
                None,
            )
            if length is not None and len(rest) >= length:
                return buf
        chunk = s.recv(65536)
        if not chunk:
            return buf
        buf += chunk


def upload_then_read(srv, head: bytes, size: int) -> bytes:
    """Send ``head`` and ``size`` more bytes in 64 KiB pieces, as a client that writes its whole request before
    reading (urllib3/requests do) would, then read the answer. Fails on a broken pipe or reset while writing."""
    with socket.create_connection(("127.0.0.1", port_of(srv)), timeout=10) as s:
        s.sendall(head)
        for _ in range(size // 65536):
            s.sendall(b"x" * 65536)
            time.sleep(0.005)
        return read_response(s)


def closed_by_server(s: socket.socket) -> bool:
    """Read until EOF (True), or until the socket's timeout passes with the connection still open (False)."""
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


# ---------------------------------------------------------------- item 5: rendering off the event loop


def test_a_slow_render_does_not_freeze_other_requests(server, models, name, monkeypatch):
    """Bug: prompts were rendered and tokenized on the event loop, so one request with thousands of messages froze
    every other request, even /health, until its render finished."""
    chat = models.models[name].chat
    rendering, release = threading.Event(), threading.Event()
    original = chat.prompt_ids

    def slow_render(messages, system=None):
        rendering.set()
        release.wait(60)
        return original(messages, system)

    monkeypatch.setattr(chat, "prompt_ids", slow_render)
    answers: list = []
    worker = threading.Thread(
        target=lambda: answers.append(post(server.url, {"model": name, "messages": HI, "max_tokens": 2}))
    )
    worker.start()
    try:
        assert rendering.wait(30)
        health = httpx.get(server.url + "/health", timeout=10)  # the render is still blocked on `release`
        assert health.status_code == 200
        assert_openai_error(httpx.get(server.url + "/v1/models/nope", timeout=10), 404)
    finally:
        release.set()
        worker.join(60)
    assert answers[0].status_code == 200, answers[0].text


@pytest.fixture
def render_calls(models, name, monkeypatch) -> list:
    chat = models.models[name].chat
    calls: list = []
    original = chat.prompt_ids

    def counting(messages, system=None):
        calls.append(len(messages))
        return original(messages, system)

    monkeypatch.setattr(chat, "prompt_ids", counting)
    return calls


def test_conversations_longer_than_the_context_are_refused_before_rendering(models, name, render_calls):
    """Bug: the server rendered and tokenized any conversation (quadratic in the number of messages, ~10 min for
    10,000 of them) before noticing it could not fit the context: a cheap count of messages and bytes must come
    first."""
    ctx = models.context_length
    with BackgroundServer(create_app(models, max_messages=10**6)) as srv:
        many = [{"role": "user", "content": "hi"}] * (ctx + 1)
        err = assert_openai_error(post(srv.url, {"model": name, "messages": many}), 400, "messages")
        assert err["code"] == "context_length_exceeded" and str(ctx) in err["message"]
        huge = [{"role": "user", "content": "x" * 2_000_000}]
        assert_openai_error(
            post(srv.url, {"model": name, "messages": huge}), 400, "messages", "context_length_exceeded"
        )
        assert render_calls == []
        # Just over the context but small: the exact token count decides (one render).
        over = [{"role": "user", "content": "x" * (ctx + 10)}]
        assert_openai_error(
            post(srv.url, {"model": name, "messages": over}), 400, "messages", "context_length_exceeded"
        )
        assert len(render_calls) == 1


# ---------------------------------------------------------------- item 6: body and message limits


def test_too_many_messages_is_400(models, name, render_calls):
    """Bug: the number of messages was unbounded (each one costs render time); past --max-messages it is a 400."""
    with BackgroundServer(create_app(models, max_messages=8)) as srv:
        err = assert_openai_error(post(srv.url, {"model": name, "messages": HI * 9}), 400, "messages")
        assert err["code"] == "too_many_messages" and "8" in err["message"]
        assert render_calls == []
        assert post(srv.url, {"model": name, "messages": HI * 8, "max_tokens": 1}).status_code == 200


def test_a_declared_50mb_body_is_refused_before_it_is_read(server):
    """Bug: the server read any body into memory before looking at it (a 50 MB message took 7.4 GB and froze it for
    138 s); a Content-Length over the limit must get 413 at once, before a byte of the body is sent."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 50000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as s:
        s.sendall(head)
        reply = read_response(s)  # nothing of the body was sent: a server waiting for it times out here
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    err = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
    assert err["code"] == "request_too_large" and "--max-body-mb" in err["message"]


def test_a_50mb_body_gets_413_not_a_reset(server):
    """Bug: an oversized body either was read whole (memory, minutes) or, once refused, the connection was reset
    under the client, which then saw a network error instead of the 413."""
    r = post(server.url, raw=b"x" * 50_000_000)
    assert_openai_error(r, 413, code="request_too_large")
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000\r\n\r\n"
    )
    assert upload_then_read(server, head, 10_000_000).startswith(b"HTTP/1.1 413 ")
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_chunked_body_is_cut_at_the_limit(models):
    """Bug: a body without Content-Length (chunked) bypassed the size check and was read to the end."""
    sent = [0]

    def chunks():
        for _ in range(64):  # 1 MiB in 16 KiB chunks against a 64 KiB limit
            sent[0] += 1
            yield b"x" * 16384

    with BackgroundServer(create_app(models, max_body_bytes=65536)) as srv:
        r = httpx.post(
            srv.url + "/v1/chat/completions",
            content=chunks(),
            headers={"content-type": "application/json"},
            timeout=60,
        )
        assert_openai_error(r, 413, code="request_too_large")
        assert httpx.get(srv.url + "/health").status_code == 200


# ---------------------------------------------------------------- item 7: slowloris and the connection limit


def test_connections_whose_requests_never_finish_are_dropped(models, name):
    """Bug: connections that never finished their headers (or body, or sent nothing) were held forever; ~20,000
    of them exhausted the file descriptors and /health failed."""
    with BackgroundServer(create_app(models), read_timeout=1, timeout_keep_alive=1) as srv:
        addr = ("127.0.0.1", port_of(srv))
        stalled = []
        for i in range(24):
            s = socket.create_connection(addr, timeout=15)
            if i % 3 == 0:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # headers never finish
            elif i % 3 == 1:
                s.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b'Content-Length: 1000\r\n\r\n{"model": '  # the body never finishes
                )
            stalled.append(s)  # i % 3 == 2: sends nothing at all
        try:
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
            assert all(closed_by_server(s) for s in stalled)
        finally:
            for s in stalled:
                s.close()
        # A request that arrived in time is never cut, however long its answer takes: here it waits for the busy
        # model past the deadline.
        admission = srv.server.config.app.state.admission
        answers: list = []
        admission.gate.acquire()
        try:
            worker = threading.Thread(
                target=lambda: answers.append(post(srv.url, {"model": name, "messages": HI, "max_tokens": 4}))
            )
            worker.start()
            time.sleep(2.5)
        finally:
            admission.gate.release()
        worker.join(60)
        assert answers[0].status_code == 200 and answers[0].json()["usage"]["completion_tokens"] == 4


def test_the_read_deadline_spares_idle_keep_alive_connections(models):
    """Bug: the request deadline ran from the previous response's end, so a keep-alive connection idle for longer
    than --read-timeout (but within --timeout-keep-alive) was cut with a 408 instead of serving its next request."""
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with BackgroundServer(create_app(models), read_timeout=1, timeout_keep_alive=10) as srv:
        with socket.create_connection(("127.0.0.1", port_of(srv)), timeout=10) as s:
            s.sendall(request)
            assert read_response(s).startswith(b"HTTP/1.1 200 ")
            time.sleep(1.5)
            s.sendall(request)
            assert read_response(s).startswith(b"HTTP/1.1 200 ")


def test_connections_past_the_limit_get_503(models):
    """Bug: the number of open connections was unbounded, so idle ones piled up until file descriptors ran out;
    past --max-connections a new one gets a 503 it can read, and service resumes when the others close."""
    with BackgroundServer(create_app(models), max_connections=4) as srv:
        idle = [socket.create_connection(("127.0.0.1", port_of(srv)), timeout=10) for _ in range(4)]
        try:
            time.sleep(0.2)  # let the server accept them
            r = httpx.get(srv.url + "/health", timeout=10)
            assert_openai_error(r, 503, code="too_many_connections")
            assert r.headers["retry-after"]
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)


# ---------------------------------------------------------------- item 9: CSRF and DNS rebinding


def test_post_needs_json_content_type(server, name):
    """Bug: a `Content-Type: text/plain` POST (which any web page may send cross-origin without a preflight) was
    accepted: CSRF against the local server."""
    body = json.dumps({"model": name, "messages": HI, "max_tokens": 1})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": ctype} if ctype else {}
        r = httpx.post(server.url + "/v1/chat/completions", content=body, headers=headers, timeout=30)
        assert_openai_error(r, 415, code="unsupported_media_type")
    ok = post(server.url, raw=body.encode(), headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_foreign_host_names_are_refused(server, name):
    """Bug: any Host header was accepted, so a DNS-rebinding page (evil.example resolving to 127.0.0.1) could call
    the API and read the replies."""
    port = port_of(server)
    for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}"):
        assert_openai_error(httpx.get(server.url + "/v1/models", headers={"host": host}), 403, code="host_not_allowed")
        r = post(server.url, {"model": name, "messages": HI}, headers={"host": host})
        assert_openai_error(r, 403, code="host_not_allowed")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LocalHost", f"192.168.1.20:{port}"):
        assert httpx.get(server.url + "/v1/models", headers={"host": host}).status_code == 200, host


def test_foreign_origins_are_refused(server, name):
    """Bug: a POST from any web page's origin was answered (CSRF); only same-origin browser requests (the page at
    /) and requests without an Origin (non-browser clients) may pass."""
    body = {"model": name, "messages": HI, "max_tokens": 1}
    for origin in ("https://evil.example", "http://localhost:3000", "null"):
        assert_openai_error(post(server.url, body, headers={"origin": origin}), 403, code="origin_not_allowed")
    assert post(server.url, body, headers={"origin": server.url}).status_code == 200
    assert post(server.url, body).status_code == 200


def test_allowed_hosts_and_origins_are_configurable(models, name):
    """Bug: --allowed-hosts / --allowed-origins (CHATLORA_ORIGINS) did not open what they name, or opened more; an
    allowed origin also needs CORS headers, or browsers still cannot read the replies."""
    app = create_app(models, allowed_hosts=["chat.lan"], allowed_origins=["http://localhost:*", "https://app.example"])
    with BackgroundServer(app) as srv:
        port = port_of(srv)
        assert httpx.get(srv.url + "/v1/models", headers={"host": f"chat.lan:{port}"}).status_code == 200
        assert httpx.get(srv.url + "/v1/models", headers={"host": "other.lan"}).status_code == 403
        body = {"model": name, "messages": HI, "max_tokens": 1}
        for origin in ("http://localhost:3000", "https://app.example"):
            r = post(srv.url, body, headers={"origin": origin})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
            pre = httpx.options(
                srv.url + "/v1/chat/completions",
                headers={
                    "origin": origin,
                    "access-control-request-method": "POST",
                    "access-control-request-headers": "content-type,authorization",
                },
            )
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
        assert post(srv.url, body, headers={"origin": "https://app.example.evil"}).status_code == 403
    with BackgroundServer(create_app(models, allowed_hosts=["*"], allowed_origins=["*"])) as srv:
        r = post(
            srv.url, {"model": name, "messages": HI, "max_tokens": 1}, headers={"host": "a.b", "origin": "http://c.d"}
        )
        assert r.status_code == 200


def test_with_an_api_key_health_reveals_only_liveness(models):
    """Bug: with --api-key set, /health still listed the models and the queue depth to anyone."""
    with BackgroundServer(create_app(models, api_key="k3y")) as srv:
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    with BackgroundServer(create_app(models)) as srv:  # without a key it is a local server's status page
        assert set(httpx.get(srv.url + "/health").json()) >= {"status", "models", "in_flight"}


# ---------------------------------------------------------------- items 10, 11, 16: hostile JSON -> 400


HI_JSON = '[{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('{"model": "MODEL", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}", id="nested"),
        pytest.param('{"model": "MODEL", "x": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}", id="nested-extra"),
        pytest.param('{"model": "MODEL", "messages": [{"role": "user", "content": "\\ud800"}]}', id="surrogate"),
        pytest.param('{"model": "\\udfff", "messages": ' + HI_JSON + "}", id="surrogate-model"),
        pytest.param('{"model": "MODEL", "messages": ' + HI_JSON + ', "seed": 1' + "0" * 4999 + "}", id="5000-digits"),
        pytest.param(
            '{"model": "MODEL", "messages": ' + HI_JSON + ', "max_tokens": ' + "9" * 5000 + "}", id="digits2"
        ),
        pytest.param('{"model": "MODEL", "messages": ' + HI_JSON + ', "temperature": NaN}', id="nan"),
    ],
)
def test_hostile_json_is_a_400_never_a_500(server, name, raw):
    """Bug: JSON nested 100k deep (RecursionError), a lone surrogate (TypeError in the tokenizer, or in encoding the
    error that echoed it) and a 5,000-digit integer (int conversion limit) crashed the handler: HTTP 500."""
    r = post(server.url, raw=raw.replace("MODEL", name).encode())
    assert_openai_error(r, 400)
    assert httpx.get(server.url + "/health").json()["in_flight"] == 0


# ---------------------------------------------------------------- item 18: headers, port, HEAD


def test_a_1mb_header_gets_431(server):
    """Bug: a 1 MB Authorization header reset the connection (the client saw a network error, not an answer): the
    server must answer 431 and drain the rest of the header before closing, so the client can finish writing."""
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer " + "x" * 1_000_000}, timeout=30)
    assert_openai_error(r, 431, code="headers_too_large")
    head = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
    assert upload_then_read(server, head, 1_000_000).startswith(b"HTTP/1.1 431 ")
    assert httpx.get(server.url + "/health").status_code == 200


def head_of(size: int) -> bytes:
    """A GET /health request head (request line, headers, blank line) of exactly ``size`` bytes."""
    start, end = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"p" * (size - len(start) - len(end)) + end


def test_request_heads_over_16_kib_get_431_even_in_one_piece(server):
    """Bug: h11 checks its 16 KiB limit only while a head is incomplete, so headers of 17-100 KB that arrived in one
    read were processed, though the README promises 431 past 16 KiB."""
    from chatlora.serve import MAX_HEADER_BYTES

    assert raw_request(server, head_of(MAX_HEADER_BYTES)).startswith(b"HTTP/1.1 200 ")
    assert raw_request(server, head_of(MAX_HEADER_BYTES + 1)).startswith(b"HTTP/1.1 431 ")
    for size in (17_000, 100_000):
        r = httpx.get(server.url + "/v1/models", headers={"X-Pad": "p" * size}, timeout=30)
        assert_openai_error(r, 431, code="headers_too_large")
    assert httpx.get(server.url + "/health").status_code == 200  # and the next request on a new connection is fine


def test_head_answers_like_get_without_a_body(server):
    """Bug: `HEAD /` was 405, so uptime checkers and link previews saw the page as broken."""
    for path in ("/", "/health"):
        get, head = httpx.get(server.url + path), httpx.head(server.url + path)
        assert head.status_code == get.status_code == 200, path
        assert head.headers["content-type"] == get.headers["content-type"] and head.content == b""


def test_a_port_in_use_fails_with_one_line_before_serving(tiny_model_dir, capsys, caplog):
    """Bug: with the port taken, `chatlora serve` loaded the model, logged "serving on ..." and then died with
    uvicorn's own error and exit code 1."""
    from chatlora.cli import main

    caplog.set_level(logging.INFO)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"127.0.0.1:{port}" in err and "in use" in err and "--port" in err
    assert not any("serving" in r.getMessage() for r in caplog.records)


def test_a_port_outside_1_to_65535_fails_before_loading(monkeypatch, capsys):
    """Bug: `chatlora serve --port 99999` served on another port (the OS takes it modulo 65536), after loading."""
    import chatlora.serve
    from chatlora.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(chatlora.serve.app, "load_models", no_load)
    for port in ("99999", "65536", "0", "-1"):
        assert main(["serve", "--model", "embedded", "--port", port]) == 2, port
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--port" in err and port in err and "65535" in err, err


def test_serve_flags_reach_the_server(monkeypatch):
    """Bug: the limit flags (and CHATLORA_ORIGINS) were parsed but never passed on, or bad values were accepted."""
    import chatlora.serve
    from chatlora.cli import main

    got: dict = {}
    monkeypatch.setattr(chatlora.serve, "run", lambda config: got.update(vars(config)))
    monkeypatch.setenv("CHATLORA_ORIGINS", "https://a.example,http://localhost:*")
    flags = ["--max-body-mb", "2", "--max-messages", "50", "--read-timeout", "7", "--timeout-keep-alive", "3"]
    flags += ["--max-connections", "9", "--allowed-hosts", "chat.lan,box"]
    assert main(["serve", "--model", "m", *flags]) == 0
    assert got["max_body_bytes"] == 2 * 2**20 and got["max_messages"] == 50
    assert got["read_timeout"] == 7 and got["timeout_keep_alive"] == 3 and got["max_connections"] == 9
    assert got["allowed_hosts"] == ["chat.lan", "box"]
    assert got["allowed_origins"] == ["https://a.example", "http://localhost:*"]
    assert main(["serve", "--model", "m", "--allowed-origins", "*"]) == 0 and got["allowed_origins"] == ["*"]
    for bad in (["--max-body-mb", "0"], ["--max-messages", "0"], ["--read-timeout", "-1"], ["--max-connections", "0"]):
        assert main(["serve", "--model", "m", *bad]) == 2, bad
    monkeypatch.delenv("CHATLORA_ORIGINS")
    assert main(["serve", "--model", "m"]) == 0  # the flags' defaults are the library's
    assert (
        got["max_body_bytes"] == chatlora.serve.MAX_BODY_BYTES and got["max_messages"] == chatlora.serve.MAX_MESSAGES
    )
    assert got["read_timeout"] == chatlora.serve.READ_TIMEOUT_S
    assert got["timeout_keep_alive"] == chatlora.serve.KEEP_ALIVE_S
    assert got["max_connections"] == chatlora.serve.MAX_CONNECTIONS
    assert got["allowed_hosts"] == got["allowed_origins"] == []

"""Serve: an OpenAI-compatible chat API and a web chat page over one base model with several LoRA adapters.

One base model is loaded once; each adapter is loaded into it under its own name and switched per request. All
generation is serialized through one FIFO gate (one model, one forward pass at a time); at most ``max_queue``
requests wait behind the running one, later ones get 503 with ``Retry-After``. Prompts go through
:meth:`ChatModel.stream`, i.e. the training template, so served prompts are token-exact with training.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .infer import ChatModel, SamplingConfig
from .model import ModelError, base_quantization, load_model, load_tokenizer, pick_device, resolve_model
from .template import TemplateError

__all__ = ["BackgroundServer", "ModelSet", "ServedModel", "create_app", "load_models", "parse_adapters", "run"]

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# ---------------------------------------------------------------- models


@dataclass
class ServedModel:
    """One entry of ``/v1/models``: a chat view (tokenizer, system prompt) and the PEFT adapter it switches to."""

    name: str
    chat: ChatModel
    adapter: str | None  # PEFT adapter name; None = base model (adapters disabled)


@dataclass
class ModelSet:
    """The served models, all sharing one network in memory."""

    models: dict[str, ServedModel]
    context_length: int
    created: int = field(default_factory=lambda: int(time.time()))


def parse_adapters(specs: Sequence[str]) -> dict[str, Path]:
    """``--adapter DIR`` or ``--adapter NAME=DIR`` flags -> ``{name: dir}`` (name defaults to the dir's name)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).is_dir():
            name, path = Path(spec).name, spec
        if not _NAME.match(name):
            raise ValueError(f"--adapter {spec}: name {name!r} must be letters, digits, '.', '_' or '-' (NAME=DIR)")
        if name in out:
            raise ValueError(f"--adapter {spec}: the name {name!r} is used twice; give NAME=DIR")
        out[name] = Path(path)
    return out


def _context_length(net, tokenizer) -> int:
    n = getattr(net.config, "max_position_embeddings", None)
    if not n:
        n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < 10**8 else 2048


def load_models(
    adapters: Mapping[str, str | Path] | None = None,
    model: str | None = None,
    base_only: bool = False,
    device: str = "auto",
) -> ModelSet:
    """Load the base once and every adapter into it by name; the base model is served too (adapters disabled).

    Args:
        adapters: ``{name: chatlora output dir}``; all must share one base model.
        model: base or merged model (hub id, dir, .gguf, 'embedded'); default: the adapters' base.
        base_only: serve only the base model of the adapters.
        device: auto, cpu, cuda or cuda:N.
    """
    from .infer import _dtype_for
    from .train import read_adapter, read_run_card

    adapters = {name: Path(d) for name, d in (adapters or {}).items()}
    if not adapters and not model:
        raise ModelError("give an adapter dir (a trained run) or a model (a base or merged model)")
    read = {name: read_adapter(d) for name, d in adapters.items()}
    cards = {name: card for name, (card, _) in read.items()}
    if model is None:
        specs = {name: spec for name, (_, spec) in read.items()}
        resolved = {resolve_model(s) for s in specs.values()}
        if len(resolved) > 1:
            raise ModelError(
                f"the adapters have different base models ({', '.join(sorted(set(specs.values())))}); "
                "serve them from separate processes"
            )
        model = next(iter(specs.values()))
    base_path = resolve_model(model)
    base_name = "embedded" if model in ("", "embedded") else Path(str(model).rstrip("/")).name
    if not _NAME.match(base_name):
        base_name = "base"
    if base_name in adapters:
        raise ModelError(f"adapter name {base_name!r} is the base model's name; give NAME=DIR with another name")

    dev = pick_device(device)
    quantize = base_quantization(list(cards.values()), dev) if adapters and not base_only else None
    net = load_model(base_path, _dtype_for(dev), dev, quantize=quantize)
    first = next(iter(adapters), None)
    base_tok = load_tokenizer(str(adapters[first]) if first else base_path)
    base_tok.padding_side = "left"
    # The base is served with the first run's system prompt, as `chatlora chat --base-only` does: fair comparisons.
    base_card = cards[first] if first else read_run_card(base_path)
    served: dict[str, ServedModel] = {}
    if adapters and not base_only:
        from peft import PeftModel

        for name, d in adapters.items():
            if not isinstance(net, PeftModel):
                net = PeftModel.from_pretrained(net, str(d), adapter_name=name)
            else:
                net.load_adapter(str(d), adapter_name=name)
            tok = load_tokenizer(str(d))
            tok.padding_side = "left"
            system = cards[name].get("template", {}).get("system_prompt")
            served[name] = ServedModel(name, ChatModel(net, tok, system, name), name)
            log.info("loaded adapter %s from %s", name, d)
    base_system = base_card.get("template", {}).get("system_prompt")
    served = {base_name: ServedModel(base_name, ChatModel(net, base_tok, base_system, base_name), None), **served}
    return ModelSet(served, _context_length(net, base_tok))


# ---------------------------------------------------------------- queue


class _Gate:
    """A FIFO lock: requests get the model in arrival order, so one can't starve behind later ones."""

    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._waiters: deque[threading.Event] = deque()
        self._busy = False

    def acquire(self) -> None:
        with self._mu:
            if not self._busy:
                self._busy = True
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()

    def release(self) -> None:
        with self._mu:
            if self._waiters:
                self._waiters.popleft().set()  # hand over: stays busy
            else:
                self._busy = False


class Admission:
    """Bounded queue in front of the model: one running plus ``max_queue`` waiting; counts for tests and logs."""

    def __init__(self, max_queue: int) -> None:
        self.capacity = max_queue + 1
        self.gate = _Gate()
        self.in_flight = 0
        self.cancelled = 0
        self.completed = 0
        self._mu = threading.Lock()
        self._avg_s = 1.0

    def try_enter(self) -> bool:
        with self._mu:
            if self.in_flight >= self.capacity:
                return False
            self.in_flight += 1
            return True

    def leave(self, seconds: float | None = None, cancelled: bool = False) -> None:
        with self._mu:
            self.in_flight -= 1
            self.completed += 1
            self.cancelled += cancelled
            if seconds is not None:
                self._avg_s = 0.8 * self._avg_s + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the requests ahead times the mean time one takes on the model."""
        return max(1, min(60, math.ceil(self._avg_s * self.in_flight)))


# ---------------------------------------------------------------- requests


class ApiError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` body."""

    model: ServedModel
    messages: list[dict]
    sampling: SamplingConfig
    stop: list[str]
    stream: bool
    include_usage: bool
    prompt_ids: list[int]


def _number(body: dict, key: str, lo: float, hi: float, integer: bool = False, lo_open: bool = False):
    value = body.get(key)
    if value is None:
        return None
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}", key, "invalid_type")
    if value < lo or value > hi or (lo_open and value == lo):
        raise ApiError(
            400, f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key, "invalid_value"
        )
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise ApiError(
        400,
        f"messages[{i}].content must be a string (or a list of text parts)",
        f"messages[{i}].content",
        "invalid_type",
    )


def parse_chat_request(body: Any, models: ModelSet, default_max_tokens: int) -> ChatRequest:
    """Validate a request body; raise :class:`ApiError` naming the bad parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'model' is required: one of " + ", ".join(models.models), "model", "invalid_type")
    served = models.models.get(name)  # looked up in the configured set only: no path from a request is opened
    if served is None:
        raise ApiError(
            404,
            f"The model '{name}' does not exist; served models: {', '.join(models.models)}",
            "model",
            "model_not_found",
        )
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(
            400,
            "'messages' must be a non-empty list of {role, content} objects",
            "messages",
            "invalid_type" if not isinstance(raw, list) else "empty_array",
        )
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ApiError(
                400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]", "invalid_type"
            )
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {m.get('role')!r}",
                f"messages[{i}].role",
                "invalid_value",
            )
        messages.append({"role": role, "content": _content(m, i)})
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be a user turn to reply to", "messages", "invalid_value")
    ctx = models.context_length
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, "only n=1 is supported", "n", "invalid_value")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1, lo_open=True)
    top_k = _number(body, "top_k", 0, 10**6, integer=True)
    repetition_penalty = _number(body, "repetition_penalty", 0, 100, lo_open=True)
    seed = _number(body, "seed", -(2**63), 2**64 - 1, integer=True)
    key = "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens"
    max_tokens = _number(body, key, 1, ctx, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop", "invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    try:
        prompt_ids = served.chat.prompt_ids(messages)
    except TemplateError as e:
        raise ApiError(400, f"cannot render these messages with the model's chat template: {e}", "messages") from None
    if len(prompt_ids) >= ctx:
        raise ApiError(
            400,
            f"This model's maximum context length is {ctx} tokens; the messages are "
            f"{len(prompt_ids)} tokens. Shorten them.",
            "messages",
            "context_length_exceeded",
        )
    defaults = SamplingConfig()
    sampling = SamplingConfig(
        max_new_tokens=min(max_tokens or default_max_tokens, ctx - len(prompt_ids)),
        temperature=defaults.temperature if temperature is None else float(temperature),
        top_p=defaults.top_p if top_p is None else float(top_p),
        top_k=defaults.top_k if top_k is None else top_k,
        repetition_penalty=defaults.repetition_penalty if repetition_penalty is None else float(repetition_penalty),
        seed=None if seed is None else seed % 2**32,
    )
    return ChatRequest(served, messages, sampling, stop, stream, bool(options.get("include_usage")), prompt_ids)


# ---------------------------------------------------------------- generation


@dataclass
class _Outcome:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _produce(req: ChatRequest, admission: Admission, stop_event: threading.Event, emit) -> None:
    """Worker thread: wait for the model, generate, call ``emit(kind, value)``; always frees the slot."""
    service_s: float | None = None
    cancelled = False
    try:
        admission.gate.acquire()
        started = time.perf_counter()
        try:
            if stop_event.is_set():  # the client left while queued
                cancelled = True
                emit("done", None)
                return
            served = req.model
            net = served.chat.model
            if served.adapter is not None:
                net.set_adapter(served.adapter)
            stream = served.chat.stream(
                req.messages, req.sampling, use_adapter=served.adapter is not None, stop_event=stop_event
            )
            hold = max((len(s) for s in req.stop), default=1) - 1
            buf, parts, matched = "", [], False
            for piece in stream:
                if matched:
                    continue  # draining after a stop string: generation ends at the next token
                buf += piece
                hits = [i for i in (buf.find(s) for s in req.stop) if i >= 0]
                if hits:
                    buf, matched = buf[: min(hits)], True
                    stop_event.set()
                    cut = len(buf)
                else:
                    cut = len(buf) - hold
                if cut > 0:
                    parts.append(buf[:cut])
                    emit("delta", buf[:cut])
                    buf = buf[cut:]
            if buf:
                parts.append(buf)
                emit("delta", buf)
            reply = stream.reply
            cancelled = stop_event.is_set() and not matched
            finish = "stop" if matched else reply.finish_reason
            emit("done", _Outcome("".join(parts), finish, reply.prompt_tokens, reply.completion_tokens))
        finally:
            service_s = time.perf_counter() - started
            admission.gate.release()
    except BaseException as e:  # surfaced to the request handler
        log.exception("generation failed")
        emit("error", e)
    finally:
        admission.leave(None if cancelled else service_s, cancelled)


def _start(req: ChatRequest, admission: Admission, stop_event: threading.Event) -> asyncio.Queue:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            stop_event.set()

    threading.Thread(target=_produce, args=(req, admission, stop_event, emit), daemon=True).start()
    return queue


# ---------------------------------------------------------------- app


class _AccessLog:
    """ASGI middleware: one log line per request, written when its body (streamed or not) is finished."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [0]
        scope.setdefault("state", {})

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            extra = scope["state"].get("log", {})
            client = (scope.get("client") or ("-",))[0]
            log.info(
                "%s %s %s %d %.0fms%s",
                client,
                scope["method"],
                scope["path"],
                status[0] or 500,
                (time.perf_counter() - started) * 1000,
                "".join(f" {k}={v}" for k, v in extra.items()),
            )


class _Auth:
    """ASGI middleware: every ``/v1/*`` call needs ``Authorization: Bearer KEY`` (constant-time compare)."""

    def __init__(self, app, key: bytes) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                err = ApiError(
                    401,
                    "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                    None,
                    "invalid_api_key",
                    kind="authentication_error",
                )
                await JSONResponse(err.body(), 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    models: ModelSet,
    api_key: str | None = None,
    max_queue: int = 16,
    log_prompts: bool = False,
    default_max_tokens: int = 256,
):
    """The FastAPI app: ``/v1/models``, ``/v1/chat/completions`` (SSE streaming), ``/health`` and the page at ``/``.

    Args:
        models: what :func:`load_models` returned.
        api_key: if set, every ``/v1/*`` call needs ``Authorization: Bearer <api_key>``.
        max_queue: requests that may wait behind the running one; more get 503 with ``Retry-After``.
        log_prompts: also log the request's messages (off by default: prompts may be private).
        default_max_tokens: reply length limit for requests that give no ``max_tokens``.
    """
    if max_queue < 0:
        raise ValueError("max_queue must be >= 0")
    app = FastAPI(title="chatlora", docs_url=None, redoc_url=None, openapi_url=None)
    admission = Admission(max_queue)
    app.state.models = models
    app.state.admission = admission
    key_bytes = api_key.encode() if api_key else None

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(ApiError(e.status_code, str(e.detail), None, code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(ApiError(422, str(e.errors()[:1]), None, "invalid_request"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("internal error")
        return error_response(ApiError(500, "internal server error", None, "internal_error", kind="server_error"))

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "models": list(models.models),
            "in_flight": admission.in_flight,
            "capacity": admission.capacity,
        }

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("chatlora").joinpath("web/index.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def list_models():
        data = [
            {"id": name, "object": "model", "created": models.created, "owned_by": "chatlora"}
            for name in models.models
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        if name not in models.models:
            raise ApiError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return {"id": name, "object": "model", "created": models.created, "owned_by": "chatlora"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
        req = parse_chat_request(body, models, default_max_tokens)
        info = request.scope["state"].setdefault("log", {})
        info.update(model=req.model.name, stream=req.stream, prompt_tokens=len(req.prompt_ids))
        if log_prompts:
            info["messages"] = json.dumps(req.messages, ensure_ascii=False)
        if not admission.try_enter():
            raise ApiError(
                503,
                "The server is busy: too many requests are queued. Retry later.",
                None,
                "server_overloaded",
                kind="server_error",
                headers={"Retry-After": str(admission.retry_after())},
            )
        stop_event = threading.Event()
        try:
            queue = _start(req, admission, stop_event)
        except BaseException:
            admission.leave()
            raise
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(o: _Outcome) -> dict:
            return {
                "prompt_tokens": o.prompt_tokens,
                "completion_tokens": o.completion_tokens,
                "total_tokens": o.prompt_tokens + o.completion_tokens,
            }

        def note(o: _Outcome | None) -> None:
            if o is not None:
                info.update(completion_tokens=o.completion_tokens, finish=o.finish_reason)
            if stop_event.is_set() and (o is None or o.finish_reason != "stop"):
                info["cancelled"] = True

        if not req.stream:
            done = False
            try:
                while not done:
                    try:
                        kind, value = await asyncio.wait_for(queue.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            stop_event.set()  # the worker sees it at the next token and frees the slot
                        continue
                    if kind == "error":
                        raise ApiError(
                            500, f"generation failed: {value}", None, "generation_error", kind="server_error"
                        )
                    done = kind == "done"
            finally:
                if not done:
                    stop_event.set()
            note(value)
            if value is None:
                raise ApiError(499, "client closed the request", None, "cancelled")
            return {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": req.model.name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": value.text},
                        "logprobs": None,
                        "finish_reason": value.finish_reason,
                    }
                ],
                "usage": usage(value),
                "system_fingerprint": None,
            }

        def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
            choices = (
                [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            )
            data = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model.name,
                "system_fingerprint": None,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            outcome = None
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await queue.get()
                    if kind == "delta":
                        yield chunk({"content": value})
                    elif kind == "error":
                        err = ApiError(
                            500, f"generation failed: {value}", None, "generation_error", kind="server_error"
                        )
                        yield f"data: {json.dumps(err.body())}\n\n"
                        break
                    else:
                        outcome = value
                        yield chunk({}, outcome.finish_reason)
                        if req.include_usage:  # OpenAI's shape: one more chunk, no choices, the usage
                            yield chunk(None, usage=usage(outcome))
                        break
                yield "data: [DONE]\n\n"
            finally:
                if outcome is None:
                    stop_event.set()  # client gone (or error): cancel the generation, free the slot
                note(outcome)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    if key_bytes is not None:
        app.add_middleware(_Auth, key=key_bytes)
    app.add_middleware(_AccessLog)  # outermost: 401s are logged too
    return app


# ---------------------------------------------------------------- running


def run(
    adapters: Mapping[str, str | Path] | None = None,
    model: str | None = None,
    base_only: bool = False,
    device: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_queue: int = 16,
    log_prompts: bool = False,
    default_max_tokens: int = 256,
) -> None:
    """Load the models and serve them with uvicorn until interrupted (see :func:`create_app` for the options)."""
    import uvicorn

    api_key = api_key or os.environ.get("CHATLORA_API_KEY") or None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    models = load_models(adapters, model, base_only, device)
    app = create_app(
        models, api_key=api_key, max_queue=max_queue, log_prompts=log_prompts, default_max_tokens=default_max_tokens
    )
    log.info("serving %s on http://%s:%d (web chat at /, OpenAI API at /v1)", ", ".join(models.models), host, port)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning", timeout_graceful_shutdown=5)


class BackgroundServer:
    """Run an app with uvicorn in a daemon thread on a free localhost port (for tests and benchmarks).

    Use as a context manager; ``url`` is ``http://127.0.0.1:PORT``.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        config = uvicorn.Config(
            app, host=host, port=port, access_log=False, log_level="warning", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = ""

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

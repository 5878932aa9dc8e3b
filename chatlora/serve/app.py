"""The app: its routes (``/v1/models``, ``/v1/chat/completions``, ``/health``, the page at ``/``), admission in front
of the engine, streaming, and :func:`run`, which loads the models and serves them with uvicorn."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..inference.engine import Engine
from ..inference.infer import Reply, Row
from ..settings import ServeConfig
from .guards import LOCAL_HOSTS, _add_guards, _bind, _server_config
from .models import ModelSet, load_models
from .schema import ApiError, ChatRequest, parse_chat_request

__all__ = ["Admission", "create_app", "run"]

log = logging.getLogger(__package__)  # one logger for the server: chatlora.serve


STREAM_INTERVAL_S = 0.05  # a stream's deltas go out at most this often (20 per second), the first at once


# ---------------------------------------------------------------- queue


class Admission:
    """Bounded admission in front of the engine: ``max_batch`` running plus ``max_queue`` waiting; past that, 503.

    Counts for ``/health``, tests and logs. ``gate`` is the engine's: held while it works on the model.
    """

    def __init__(self, max_queue: int, max_batch: int, gate: threading.Lock) -> None:
        self.capacity = max_batch + max_queue
        self.max_batch = max_batch
        self.gate = gate
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
        """Seconds until a slot is likely free: the batches ahead times the mean time a request takes."""
        return max(1, min(60, math.ceil(self._avg_s * self.in_flight / self.max_batch)))


# ---------------------------------------------------------------- app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, answered in OpenAI's shape."""

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


def _add_info_routes(app: FastAPI, models: ModelSet, admission: Admission, public: bool) -> None:
    """``/health``, the web page at ``/`` and ``/v1/models``. ``public``: no API key, so /health may say more."""

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if not public:  # only liveness: what is served and how busy it is are for key holders
            return {"status": "ok"}
        return {
            "status": "ok",
            "models": list(models.models),
            "in_flight": admission.in_flight,
            "capacity": admission.capacity,
            "max_batch": admission.max_batch,
        }

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("chatlora").joinpath("web/index.html").read_text(encoding="utf-8"))

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": models.created, "owned_by": "chatlora"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card(name) for name in models.models]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        if name not in models.models:
            raise ApiError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return card(name)


def _add_chat_route(
    app: FastAPI,
    models: ModelSet,
    admission: Admission,
    engine: Engine,
    default_max_tokens: int,
    max_messages: int,
    log_prompts: bool,
) -> None:
    """``/v1/chat/completions``: validate, admit (or 503), hand the row to the engine, answer or stream."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            raw = await request.body()
        except ClientDisconnect:  # e.g. dropped by the read timeout mid-body
            raise ApiError(499, "client closed the request", None, "cancelled") from None
        # Off the event loop: rendering a long conversation may take a while, and /health must not wait for it.
        req = await run_in_threadpool(parse_chat_request, raw, models, default_max_tokens, max_messages)
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
        try:
            job = _Job(req, admission)
            engine.submit(job.row())
        except BaseException:
            admission.leave()
            raise

        def note(reply: Reply | None) -> None:
            if reply is not None:
                info.update(completion_tokens=reply.completion_tokens, finish=reply.finish_reason)
            if reply is None or reply.finish_reason == "cancelled":
                info["cancelled"] = True

        if req.stream:
            return StreamingResponse(
                _sse(job, note),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            body = await _complete(job, request)
        except ApiError:
            note(None)
            raise
        info.update(completion_tokens=body["usage"]["completion_tokens"], finish=body["choices"][0]["finish_reason"])
        return body


def create_app(models: ModelSet, config: ServeConfig | None = None, **settings: Any):
    """The FastAPI app: ``/v1/models``, ``/v1/chat/completions`` (SSE streaming), ``/health`` and the page at ``/``.

    Args:
        models: what :func:`load_models` returned.
        config: the settings (:class:`~chatlora.settings.ServeConfig`, checked here); ``settings``: fields of it
            that replace ``config``'s. Those the app uses:
            ``api_key``: if set, every ``/v1/*`` call needs ``Authorization: Bearer <api_key>``, and ``/health``
            says only ``{"status": "ok"}``. Without one, ``Host`` must be an IP address, localhost or in
            ``allowed_hosts``, and a browser's ``Origin`` must be the server's own or match ``allowed_origins``.
            ``max_queue``: requests that may wait beyond a full batch; more get 503 with ``Retry-After``.
            ``max_batch``: requests generated together (continuous batching, :class:`~chatlora.inference.engine.Engine`); 1: one
            at a time; None: 64 on a GPU, 8 elsewhere.
            ``log_prompts``: also log the request's messages (off by default: prompts may be private).
            ``default_max_tokens``: reply length limit for requests that give no ``max_tokens``.
            ``max_body_bytes`` (larger bodies get 413), ``max_messages`` (more get 400), ``allowed_hosts`` (more
            ``Host`` names to accept, ``"*"``: any), ``allowed_origins`` (``Origin`` patterns to accept and answer
            with CORS headers, e.g. ``http://localhost:*``; ``"*"``: any).
    """
    cfg = replace(config or ServeConfig(), **settings).check()
    first = next(iter(models.models.values())).chat  # every served model shares this network
    # generate's default batch, which depends on the device
    max_batch = cfg.max_batch if cfg.max_batch is not None else first.batch_size
    app = FastAPI(title="chatlora", docs_url=None, redoc_url=None, openapi_url=None)
    engine = first.engine
    engine.max_batch = max_batch
    admission = Admission(cfg.max_queue, max_batch, engine.gate)
    app.state.models, app.state.admission, app.state.engine = models, admission, engine
    key = cfg.api_key.encode() if cfg.api_key else None
    _add_error_handlers(app)
    _add_info_routes(app, models, admission, public=key is None)
    _add_chat_route(app, models, admission, engine, cfg.default_max_tokens, cfg.max_messages, cfg.log_prompts)
    _add_guards(app, key, cfg.allowed_hosts, cfg.allowed_origins, cfg.max_body_bytes)
    return app


# ---------------------------------------------------------------- generation


class _Job:
    """One admitted request on its way through the engine: its events arrive on an asyncio queue.

    Events: ``("delta", text)``, then ``("done", Reply)`` or ``("error", exception)``. The admission slot is given back
    exactly once, when the row finishes, fails or is cancelled (``cancel`` set: the client left).
    """

    def __init__(self, req: ChatRequest, admission: Admission) -> None:
        self.req = req
        self.admission = admission
        self.cancel = threading.Event()
        self.events: asyncio.Queue = asyncio.Queue()
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self._loop = asyncio.get_running_loop()
        self._submitted = time.perf_counter()
        self._pending, self._sent_at = "", -math.inf  # text not yet handed to the loop, and when text last was

    def row(self) -> Row:
        return self.req.model.chat.row(
            self.req.prompt_ids,
            self.req.sampling,
            stop=self.req.stop,
            on_text=self._text,
            on_done=self._done,
            on_error=self._failed,
            cancel=self.cancel,
        )

    def _text(self, text: str) -> None:
        # Called by the generating thread for every token of every row. Handing each one to the event loop makes
        # the loop write a chunk per token per stream, holding the GIL the generating thread needs between its
        # kernel launches; so after the first delta, text goes out at most every STREAM_INTERVAL_S (the rest
        # follows with the next delta or the end).
        self._pending += text
        now = time.perf_counter()
        if now - self._sent_at >= STREAM_INTERVAL_S:
            self._sent_at = now
            self._emit("delta", self._pending)
            self._pending = ""

    def _emit(self, kind: str, value: Any) -> None:
        if kind != "delta" and self._pending:
            text, self._pending = self._pending, ""
            self._emit("delta", text)
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel.set()

    def _done(self, reply: Reply) -> None:
        cancelled = reply.finish_reason == "cancelled"
        self.admission.leave(None if cancelled else time.perf_counter() - self._submitted, cancelled)
        self._emit("done", reply)

    def _failed(self, e: BaseException) -> None:
        self.admission.leave()
        self._emit("error", e)

    def usage(self, reply: Reply) -> dict:
        return {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        }


def _generation_failed(e: BaseException) -> ApiError:
    return ApiError(500, f"generation failed: {e}", None, "generation_error", kind="server_error")


async def _complete(job: _Job, request: Request) -> dict:
    """A non-streamed reply: wait for the row, cancelling it if the client hangs up meanwhile."""
    reply: Reply | None = None
    try:
        while reply is None:
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()  # the engine ends the row at its next token and frees the slot
                continue
            if kind == "error":
                raise _generation_failed(value)
            if kind == "done":
                reply = value
    finally:
        if reply is None:
            job.cancel.set()
    if reply.finish_reason == "cancelled":
        raise ApiError(499, "client closed the request", None, "cancelled")
    return {
        "id": job.id,
        "object": "chat.completion",
        "created": job.created,
        "model": job.req.model.name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.text},
                "logprobs": None,
                "finish_reason": reply.finish_reason,
            }
        ],
        "usage": job.usage(reply),
        "system_fingerprint": None,
    }


def _chunk(job: _Job, delta: dict | None, finish: str | None = None, **extra) -> str:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    data = {
        "id": job.id,
        "object": "chat.completion.chunk",
        "created": job.created,
        "model": job.req.model.name,
        "system_fingerprint": None,
        "choices": choices,
        **extra,
    }
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(job: _Job, on_end: Callable[[Reply | None], None]) -> AsyncIterator[str]:
    """A streamed reply as server-sent events in OpenAI's shape; a client that leaves cancels its row."""
    reply: Reply | None = None
    try:
        yield _chunk(job, {"role": "assistant", "content": ""})
        pending = None
        while True:
            kind, value = pending or await job.events.get()
            pending = None
            if kind == "delta":
                # Deltas that piled up while this loop was busy (many streams at once) go out as one chunk.
                while pending is None and not job.events.empty():
                    pending = job.events.get_nowait()
                    if pending[0] == "delta":
                        value, pending = value + pending[1], None
                yield _chunk(job, {"content": value})
            elif kind == "error":
                yield f"data: {json.dumps(_generation_failed(value).body())}\n\n"
                break
            else:
                reply = value
                yield _chunk(job, {}, reply.finish_reason)
                if job.req.include_usage:  # OpenAI's shape: one more chunk, no choices, the usage
                    yield _chunk(job, None, usage=job.usage(reply))
                break
        yield "data: [DONE]\n\n"
    finally:
        if reply is None:
            job.cancel.set()  # client gone (or error): cancel the row, free the slot
        on_end(reply)


# ---------------------------------------------------------------- running


def run(config: ServeConfig | None = None, **settings: Any) -> None:
    """Load the models and serve them with uvicorn until interrupted.

    ``config``: :class:`~chatlora.settings.ServeConfig` (``settings``: fields of it that replace its own; see
    :func:`create_app` for what they mean), checked before anything loads. Without an ``api_key``, the environment's
    ``CHATLORA_API_KEY`` is the key. The port (1-65535) is taken before the models load: a busy or impossible one
    fails at once, with a ConfigError saying so. ``read_timeout``, ``timeout_keep_alive`` and ``max_connections``:
    see :class:`_Http`.
    """
    import uvicorn

    cfg = replace(config or ServeConfig(), **settings)
    cfg = replace(cfg, api_key=cfg.api_key or os.environ.get("CHATLORA_API_KEY") or None).check()
    host, port = cfg.host, cfg.port
    if host not in LOCAL_HOSTS and not cfg.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    sock = _bind(host, port)
    try:
        models = load_models(cfg.adapters, cfg.model, cfg.base_only, cfg.device, cfg.dtype)
        # the name the server was started with is the user's own
        app = create_app(models, cfg, allowed_hosts=[host, *cfg.allowed_hosts])
        bound = sock.getsockname()[1]
        url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
        log.info("serving %s on %s (web chat at /, OpenAI API at /v1)", ", ".join(models.models), url)
        server = _server_config(app, host, port, cfg.read_timeout, cfg.timeout_keep_alive, cfg.max_connections)
        uvicorn.Server(server).run(sockets=[sock])
    finally:
        sock.close()

"""Serve: an OpenAI-compatible chat API and a web chat page over one base model with several LoRA adapters.

One base model is loaded once; each adapter is loaded into it under its own name. Requests are batched dynamically
(:class:`~chatlora.infer.Batcher`): while a batch runs, new requests wait, and the next batch takes all that wait,
up to ``max_batch``; requests for different adapters and the base share a batch (PEFT's ``adapter_names=``), each
with its own sampling settings, seed, reply limit and stop strings, streamed and cancelled on its own. At most
``max_batch + max_queue`` requests are admitted; later ones get 503 with ``Retry-After``. Prompts go through
:meth:`ChatModel.prompt_ids`, i.e. the training template, so served prompts are token-exact with training.

Hostile clients meet limits before they cost anything: the body size (413, checked on ``Content-Length`` before a
byte is read), the number of messages and a byte count against the context (400, before rendering), a deadline for
receiving a whole request and a cap on open connections (:class:`_Http`), and, without an API key, ``Host`` and
``Origin`` checks against DNS rebinding and cross-site requests (:class:`_Guard`). Rendering and tokenizing run in a
worker thread, so a slow one never stalls other requests.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import h11
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import ConfigError, ModelError, TemplateError
from .infer import BASE, Batcher, ChatModel, Reply, Row, SamplingConfig
from .model import (
    context_length,
    load_tokenizer,
    resolve_model,
)
from .run import load_base, open_model, open_run
from .settings import KEEP_ALIVE_S, MAX_BODY_BYTES, MAX_CONNECTIONS, MAX_MESSAGES, READ_TIMEOUT_S, ServeConfig

__all__ = [
    "KEEP_ALIVE_S",
    "MAX_BODY_BYTES",
    "MAX_CONNECTIONS",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGES",
    "READ_TIMEOUT_S",
    "ModelSet",
    "ServeConfig",
    "ServedModel",
    "create_app",
    "load_models",
    "parse_adapters",
    "run",
]

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Defaults of the limits that are not flags; those that are live in chatlora.settings (ServeConfig).
STREAM_INTERVAL_S = 0.05  # a stream's deltas go out at most this often (20 per second), the first at once
MAX_HEADER_BYTES = 16 * 2**10  # a request's head: request line, headers and the blank line after them; else 431
LINGER_S = 2.0  # after refusing a request mid-upload: read and drop its rest this long, so the client sees why
LINGER_BYTES = 64 * 2**20
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


# ---------------------------------------------------------------- models


@dataclass
class ServedModel:
    """One entry of ``/v1/models``: a chat view (tokenizer, system prompt) and the PEFT adapter it switches to."""

    name: str
    chat: ChatModel
    adapter: str | None  # PEFT adapter name; None = base model (adapters disabled)
    max_token_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        # The most text one token can stand for: UTF-8 bytes of the longest vocabulary entry (byte-level entries
        # like 'Ġ' count 2 for 1, an overestimate). Bounds a prompt's token count from below without tokenizing it.
        self.max_token_bytes = max((len(t.encode("utf-8")) for t in self.chat.tokenizer.get_vocab()), default=1)


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
            raise ConfigError(f"--adapter {spec}: name {name!r} must be letters, digits, '.', '_' or '-' (NAME=DIR)")
        if name in out:
            raise ConfigError(f"--adapter {spec}: the name {name!r} is used twice; give NAME=DIR")
        out[name] = Path(path)
    return out


def load_models(
    adapters: Mapping[str, str | Path] | None = None,
    model: str | None = None,
    base_only: bool = False,
    device: str = "auto",
    dtype: str = "auto",
) -> ModelSet:
    """Load the base once and every adapter into it by name; the base model is served too (adapters disabled).

    Args:
        adapters: ``{name: chatlora output dir}``; all must share one base model.
        model: base or merged model (hub id, dir, .gguf, 'embedded'); default: the adapters' base.
        base_only: serve only the base model of the adapters.
        device: auto, cpu, cuda or cuda:N.
        dtype: the base's dtype: auto, fp32, bf16 or fp16 (:func:`~chatlora.model.dtype_for`).
    """
    adapters = {name: Path(d) for name, d in (adapters or {}).items()}
    if not adapters and not model:
        raise ModelError("give an adapter dir (a trained run) or a model (a base or merged model)")
    runs = {name: open_run(d) for name, d in adapters.items()}
    if model is None:
        specs = {name: run.base_spec for name, run in runs.items()}
        resolved = {resolve_model(s) for s in specs.values()}
        if len(resolved) > 1:
            raise ModelError(
                f"the adapters have different base models ({', '.join(sorted(set(specs.values())))}); "
                "serve them from separate processes"
            )
        model = next(iter(specs.values()))
    base_name = "embedded" if model in ("", "embedded") else Path(str(model).rstrip("/")).name
    if not _NAME.match(base_name):
        base_name = "base"
    if base_name in adapters:
        raise ModelError(f"adapter name {base_name!r} is the base model's name; give NAME=DIR with another name")

    attached = list(runs.values()) if not base_only else []
    net = load_base(model, device, dtype, attached)
    first = next(iter(runs.values()), None)
    # The base is served with the first run's system prompt, as `chatlora chat --base-only` does: fair comparisons.
    base_run = first or open_model(model)
    base_tok = base_run.tokenizer
    base_tok.padding_side = "left"
    served: dict[str, ServedModel] = {}
    for name, run in runs.items() if not base_only else ():
        net = run.attach(net, name)
        tok = load_tokenizer(str(run.path))  # its own instance: the base view's is the first run's
        tok.padding_side = "left"
        served[name] = ServedModel(name, ChatModel(net, tok, run.system_prompt, name, adapter=name), name)
        log.info("loaded adapter %s from %s", name, run.path)
    base_system = base_run.system_prompt
    base_chat = ChatModel(net, base_tok, base_system, base_name, adapter=BASE)
    served = {base_name: ServedModel(base_name, base_chat, None), **served}
    return ModelSet(served, context_length(net, base_tok))


# ---------------------------------------------------------------- queue


class Admission:
    """Bounded admission in front of the batcher: ``max_batch`` running plus ``max_queue`` waiting; past that, 503.

    Counts for ``/health``, tests and logs. ``gate`` is the batcher's: held while a batch runs.
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


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    ):
        return "".join(p["text"] for p in value)
    raise PydanticCustomError("invalid_type", "must be a string (or a list of text parts)")


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(s, str) and s for s in value):
        return value
    raise PydanticCustomError("invalid_value", "must be a non-empty string or a list of up to 4 of them")


class _Message(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[str, BeforeValidator(_text)]


class _StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _ChatBody(BaseModel):
    """The fields of OpenAI's chat request that chatlora uses or refuses. Strict: no "5" for 5.

    Fields that would change the reply and that chatlora does not do are declared so they can be refused when set
    (:data:`_OFF`); fields that change nothing about the reply (``user``, ``metadata``, ``store``, ``service_tier``,
    ``parallel_tool_calls``, ``prediction``, ``prompt_cache_key``, ``safety_identifier``, ``reasoning_effort``,
    ``verbosity``: hints for reasoning models, which these are not) are ignored, like unknown ones.
    """

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    model: str = Field(min_length=1)
    messages: list[_Message] = Field(min_length=1)
    temperature: float | None = Field(None, **SamplingConfig.bounds("temperature"))
    top_p: float | None = Field(None, **SamplingConfig.bounds("top_p"))
    top_k: int | None = Field(None, **SamplingConfig.bounds("top_k"))
    repetition_penalty: float | None = Field(None, **SamplingConfig.bounds("repetition_penalty"))
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=1)
    stop: Annotated[list[str], BeforeValidator(_stops)] = []
    stream: bool | None = None
    stream_options: _StreamOptions | None = None
    tools: list | None = None  # refused when not empty: chatlora models are tuned for plain chat
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # {"token id": bias}
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    # refused unless off (_OFF)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    modalities: list[str] | None = None
    audio: dict | None = None
    web_search_options: dict | None = None


# OpenAI's chat fields that would change the reply, with the values that mean "off"; set to anything else they get a
# 400 naming them, never a reply that silently ignored them. (n > 1 and non-empty tools are refused by their own
# checks; logit_bias, presence_penalty and frequency_penalty are honoured.)
_OFF: dict[str, Callable[[Any], bool]] = {
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v == 0,
    "response_format": lambda v: v == {"type": "text"},
    "tool_choice": lambda v: v in ("none", "auto"),  # without tools there is none to choose
    "functions": lambda v: v == [],
    "function_call": lambda v: v in ("none", "auto"),
    "modalities": lambda v: v == ["text"],
    "audio": lambda v: False,
    "web_search_options": lambda v: False,
}


def _unsupported(body: _ChatBody) -> ApiError | None:
    """A 400 for the first field of :data:`_OFF` that is set to something chatlora does not do."""
    for name, off in _OFF.items():
        value = getattr(body, name)
        if value is not None and not off(value):
            return ApiError(
                400,
                f"'{name}' is not supported by this server (got {json.dumps(value)[:60]}); leave it out",
                name,
                "unsupported_parameter",
            )
    return None


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    """OpenAI's ``{"token id": bias}`` -> ``{id: bias}`` without the zeros; a 400 for a key that is no token id."""
    out = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab):
            raise ApiError(
                400,
                f"'logit_bias' keys must be token ids from 0 to {vocab - 1}; got {key[:40]!r}",
                "logit_bias",
                "invalid_value",
            )
        if value:
            out[int(key)] = value
    return out or None


def _param(loc: tuple) -> str | None:
    """Pydantic's ``('messages', 0, 'content')`` -> OpenAI's ``messages[0].content``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or None


def _invalid(e: ValidationError, models: ModelSet) -> ApiError:
    """The first validation error as an OpenAI-shaped 400 naming the parameter."""
    err = e.errors(include_url=False)[0]
    kind, param, msg = err["type"], _param(err["loc"]), err["msg"]
    if kind == "json_invalid":  # also: nesting past 200 levels, lone surrogates, integers past 4,300 digits
        return ApiError(400, f"the request body is not valid JSON: {err['ctx']['error']}", None, "invalid_json")
    if param is None:
        return ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    code = "invalid_type" if kind.endswith("_type") else "invalid_value"
    if kind == "missing":
        text, code = f"'{param}' is required", "missing_required_parameter"
    elif kind in ("too_short", "string_too_short"):
        text, code = f"'{param}' must not be empty", "empty_array" if kind == "too_short" else code
    elif msg.startswith(("Input should be", "must")):
        text = f"'{param}' {msg.replace('Input should be', 'must be', 1)}"
        if kind == "literal_error":
            text += f"; got {str(err['input'])[:40]!r}"
    else:
        text = f"'{param}': {msg}"
    if param == "model":
        text += "; served models: " + ", ".join(models.models)
    return ApiError(400, text, param, code)


def _too_long(messages: list[dict], served: ServedModel, ctx: int) -> ApiError | None:
    """A cheap lower bound on the prompt's tokens (no rendering): every message takes at least one token, and one
    token stands for at most ``max_token_bytes`` bytes of text."""
    if len(messages) >= ctx:
        return ApiError(
            400,
            f"This model's maximum context length is {ctx} tokens; {len(messages)} messages take at least one "
            "token each. Shorten the conversation.",
            "messages",
            "context_length_exceeded",
        )
    size = sum(len(m["content"].encode("utf-8")) for m in messages)
    if size > ctx * served.max_token_bytes:
        return ApiError(
            400,
            f"This model's maximum context length is {ctx} tokens; the messages hold {size} bytes of text, more "
            f"than {ctx} tokens can (at most {served.max_token_bytes} bytes each). Shorten them.",
            "messages",
            "context_length_exceeded",
        )
    return None


def parse_chat_request(
    raw: bytes | str, models: ModelSet, default_max_tokens: int, max_messages: int = MAX_MESSAGES
) -> ChatRequest:
    """Validate a request body and render its prompt; raise :class:`ApiError` naming the bad parameter.

    Slow for long conversations (it renders and tokenizes): the server calls it in a worker thread.
    """
    try:
        body = _ChatBody.model_validate_json(raw)
    except ValidationError as e:
        raise _invalid(e, models) from None
    served = models.models.get(body.model)  # looked up in the configured set only: no path from a request is opened
    if served is None:
        raise ApiError(
            404,
            f"The model '{body.model[:100]}' does not exist; served models: {', '.join(models.models)}",
            "model",
            "model_not_found",
        )
    if body.tools:
        raise ApiError(400, "'tools' is not supported: this server does plain chat", "tools", "unsupported_parameter")
    unsupported = _unsupported(body)
    if unsupported is not None:
        raise unsupported
    logit_bias = _logit_bias(body.logit_bias, len(served.chat.tokenizer))
    if len(body.messages) > max_messages:
        raise ApiError(
            400,
            f"'messages' holds {len(body.messages)} messages; this server takes at most {max_messages} "
            "(--max-messages)",
            "messages",
            "too_many_messages",
        )
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    if messages[-1]["role"] != "user":
        raise ApiError(400, "the last message must be a user turn to reply to", "messages", "invalid_value")
    ctx = models.context_length
    key = "max_completion_tokens" if body.max_tokens is None else "max_tokens"
    max_tokens = getattr(body, key)
    if max_tokens is not None and max_tokens > ctx:
        raise ApiError(400, f"'{key}' must be at most {ctx} (the model's context length)", key, "invalid_value")
    too_long = _too_long(messages, served, ctx)
    if too_long is not None:
        raise too_long
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
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=defaults.top_k if body.top_k is None else body.top_k,
        repetition_penalty=defaults.repetition_penalty if body.repetition_penalty is None else body.repetition_penalty,
        seed=None if body.seed is None else body.seed % 2**32,
        logit_bias=logit_bias,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
    )
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return ChatRequest(served, messages, sampling, body.stop, bool(body.stream), include_usage, prompt_ids)


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


class _Guard:
    """ASGI middleware in front of the app: the body size cap (413), JSON-only POSTs (415) and, when ``hosts`` /
    ``origins`` are given, the ``Host`` and ``Origin`` checks (403) that stop DNS rebinding and cross-site requests.

    ``hosts``: names accepted besides IP addresses (a rebinding page needs a domain name, never an IP literal);
    ``None`` accepts any. ``origins``: glob patterns (``http://localhost:*``) accepted besides the server's own
    origin; ``None`` accepts any. A request without ``Origin`` (any non-browser client) passes.
    """

    def __init__(self, app, max_body_bytes: int, hosts: set[str] | None, origins: list[str] | None) -> None:
        self.app, self.max_body_bytes, self.hosts, self.origins = app, max_body_bytes, hosts, origins

    def _host_ok(self, host: str | None) -> bool:
        if self.hosts is None or host is None:
            return True
        name = host.strip().lower()
        name = name[1 : name.find("]")] if name.startswith("[") else name.rpartition(":")[0] if ":" in name else name
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name.rstrip(".") in self.hosts

    def _origin_ok(self, origin: str | None, host: str | None) -> bool:
        if self.origins is None or origin is None:
            return True
        if host is not None and origin.partition("://")[2].lower() == host.strip().lower():
            return True  # same origin: the page at /
        return any(fnmatch.fnmatchcase(origin, p) for p in self.origins)

    def _check(self, scope) -> ApiError | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host"), headers.get("origin")
        if not self._host_ok(host):
            return ApiError(
                403,
                f"Host {host!r} is not allowed (DNS rebinding guard): call the server by IP or localhost, or start "
                "it with --allowed-hosts NAME",
                None,
                "host_not_allowed",
                kind="permission_error",
            )
        if not self._origin_ok(origin, host):
            return ApiError(
                403,
                f"Origin {origin!r} is not allowed (cross-site request guard); start the server with "
                "--allowed-origins ORIGIN (or CHATLORA_ORIGINS) to allow it",
                None,
                "origin_not_allowed",
                kind="permission_error",
            )
        media = headers.get("content-type", "").partition(";")[0].strip().lower()
        if scope["method"] == "POST" and media != "application/json":
            return ApiError(
                415,
                f"send the body as JSON with 'Content-Type: application/json' (got {media or 'none'!r})",
                None,
                "unsupported_media_type",
            )
        declared = headers.get("content-length", "")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > self.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"the request body is larger than this server's limit of {self.max_body_bytes} bytes (--max-body-mb)",
            None,
            "request_too_large",
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        err = self._check(scope)
        if err is not None:
            # No 'Connection: close': uvicorn then reads and drops the rest of an upload, and the client gets the
            # answer instead of a reset.
            await JSONResponse(err.body(), err.status, err.headers)(scope, receive, send)
            return
        received = 0

        async def capped_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:  # a chunked body has no Content-Length to check up front
                    raise self._too_large()
            return message

        await self.app(scope, capped_receive, send)


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
    batcher: Batcher,
    default_max_tokens: int,
    max_messages: int,
    log_prompts: bool,
) -> None:
    """``/v1/chat/completions``: validate, admit (or 503), hand the row to the batcher, answer or stream."""

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
            batcher.submit(job.row())
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


def _add_guards(
    app: FastAPI,
    key: bytes | None,
    allowed_hosts: Sequence[str],
    allowed_origins: Sequence[str],
    max_body_bytes: int,
) -> None:
    """The middleware stack, innermost first: API key, CORS, Host/Origin/size guard, access log."""
    if key is not None:
        app.add_middleware(_Auth, key=key)
    origins = [o for o in allowed_origins if o]
    if origins:  # outside _Auth: a browser's preflight carries no key
        if "*" in origins:
            app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
        else:
            regex = "|".join(fnmatch.translate(o) for o in origins)
            app.add_middleware(CORSMiddleware, allow_origin_regex=regex, allow_methods=["*"], allow_headers=["*"])
    # With a key, neither rebinding nor a cross-site page gets anywhere without it: Host and Origin go unchecked.
    hosts = None if key is not None or "*" in allowed_hosts else {*LOCAL_HOSTS, *(h.lower() for h in allowed_hosts)}
    app.add_middleware(
        _Guard,
        max_body_bytes=max_body_bytes,
        hosts=hosts,
        origins=None if key is not None or "*" in origins else origins,
    )
    app.add_middleware(_AccessLog)  # outermost: refusals and 401s are logged too


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
            ``max_batch``: requests generated together (dynamic batching, :class:`~chatlora.infer.Batcher`); 1: one
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
    batcher = Batcher(first.model, first.tokenizer.pad_token_id, max_batch)
    admission = Admission(cfg.max_queue, max_batch, batcher.gate)
    app.state.models, app.state.admission, app.state.batcher = models, admission, batcher
    key = cfg.api_key.encode() if cfg.api_key else None
    _add_error_handlers(app)
    _add_info_routes(app, models, admission, public=key is None)
    _add_chat_route(app, models, admission, batcher, cfg.default_max_tokens, cfg.max_messages, cfg.log_prompts)
    _add_guards(app, key, cfg.allowed_hosts, cfg.allowed_origins, cfg.max_body_bytes)
    return app


# ---------------------------------------------------------------- generation


class _Job:
    """One admitted request on its way through the batcher: its events arrive on an asyncio queue.

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
                    job.cancel.set()  # the batcher ends the row at its next token and frees the slot
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


class _HeadCap(h11.Connection):
    """h11's server connection with its size limit applied to every request head, complete or not.

    h11 checks ``max_incomplete_event_size`` only while a head is still incomplete, so a 100 KB head that arrived in
    one read passed. Here the bytes a request's head took from the buffer are counted too; over the limit,
    ``too_large`` is set and the RemoteProtocolError makes uvicorn call :meth:`_Http.send_400_response`.
    """

    too_large = False

    def next_event(self):  # type: ignore[override]
        # h11's receive buffer: its length, not trailing_data's copy, so a head trickled byte by byte costs nothing
        before = len(self._receive_buffer) if self.their_state is h11.IDLE else None
        event = super().next_event()
        if before is not None and isinstance(event, h11.Request):
            if before - len(self._receive_buffer) > self._max_incomplete_event_size:
                self.too_large = True
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
        return event


class _Http(H11Protocol):
    """uvicorn's h11 protocol plus what it lacks against slow or hostile clients.

    - A deadline (``read_timeout``) for receiving a whole request, headers and body, counted from its first byte
      (or from the connection's start): uvicorn's keep-alive timer only covers silence after a response, so a
      connection that sent nothing, or trickled its headers without ever finishing them, was held forever.
    - A cap on open connections (``max_connections``): the ones past it get a 503 and are closed.
    - Header errors answered with their status (431 when the headers are too large, else 400) as OpenAI-shaped JSON,
      and a lingering close after such refusals (RFC 9112 9.6): closed at once, the socket breaks the pipe of a
      client still writing its request, and clients that write before they read (urllib3) report that instead of
      the answer; so the server half-closes and reads and drops the rest for a moment first.
    """

    read_timeout: float = READ_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.conn = _HeadCap(h11.SERVER, self.config.h11_max_incomplete_event_size)  # before any byte arrives

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._dropped: int | None = None  # bytes read and dropped while lingering; None: not lingering
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d are open (--max-connections)", len(self.connections) - 1)
            self._refuse(503, "too many open connections; retry shortly", "too_many_connections", "Retry-After: 1")
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._dropped is not None:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self.transport.close()
            return
        if self._read_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm()  # the first bytes of the next request on this connection
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._disarm()
        super().on_response_complete()  # may start a pipelined request that is already here
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and cycle.more_body and not self.transport.is_closing():
            self._arm()

    def shutdown(self) -> None:
        if self._dropped is not None:  # refused and lingering: h11 has nothing to close gracefully
            self.transport.close()
            return
        super().shutdown()

    def send_400_response(self, msg: str) -> None:  # uvicorn calls it on any h11.RemoteProtocolError
        too_large = getattr(self.conn, "too_large", False)  # a complete head over the limit (_HeadCap)
        if too_large or len(self.conn.trailing_data[0]) > self.config.h11_max_incomplete_event_size:
            self._refuse(
                431,
                f"the request headers are larger than this server's limit of "
                f"{self.config.h11_max_incomplete_event_size} bytes",
                "headers_too_large",
            )
        else:
            self._refuse(400, "invalid HTTP request", "invalid_http_request")

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and (cycle.response_started or not cycle.more_body):
            return  # the request is in and being answered: a long reply is no reason to cut it
        if not self.transport.is_closing():  # headers or body still incomplete
            self.transport.write(self._raw(408, "the request did not arrive in time", "request_timeout"))
            self.transport.close()

    @staticmethod
    def _raw(status: int, message: str, code: str, *headers: str) -> bytes:
        body = json.dumps(ApiError(status, message, None, code).body()).encode()
        head = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *headers,
        ]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body

    def _refuse(self, status: int, message: str, code: str, *headers: str) -> None:
        """Answer outside h11 (its state is an error, or no request was read yet), then close gracefully."""
        self._disarm()
        self.transport.write(self._raw(status, message, code, *headers))
        self._dropped = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the client reads the answer and an end of stream, while we drain its input
        self.loop.call_later(LINGER_S, self.transport.close)


def _server_config(
    app,
    host: str,
    port: int,
    read_timeout: float = READ_TIMEOUT_S,
    timeout_keep_alive: float = KEEP_ALIVE_S,
    max_connections: int = MAX_CONNECTIONS,
    graceful_s: int = 5,
):
    import uvicorn

    if read_timeout <= 0 or timeout_keep_alive <= 0 or max_connections <= 0:
        raise ConfigError("read_timeout, timeout_keep_alive and max_connections must be > 0")
    protocol = type("HttpProtocol", (_Http,), {"read_timeout": read_timeout, "max_connections": max_connections})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        ws="none",
        timeout_keep_alive=timeout_keep_alive,  # type: ignore[arg-type]  # a float works (loop.call_later)
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=graceful_s,
    )


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or a ConfigError that says why not (the port is taken, ...)."""
    sock = None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart past TIME_WAIT
        sock.bind(addr)
        return sock
    except OSError as e:
        if sock is not None:
            sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        why = (
            "the address is already in use (is another server running?)"
            if e.errno == errno.EADDRINUSE
            else e.strerror or str(e)
        )
        raise ConfigError(f"cannot serve on {where}: {why}; pick another --port or --host") from None


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

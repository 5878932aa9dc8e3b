"""OpenAI's chat-completions shapes on pydantic: a request body checked field by field, errors in OpenAI's form."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from ..errors import TemplateError
from ..inference.infer import SamplingConfig
from ..settings import MAX_MESSAGES
from .models import ModelSet, ServedModel

__all__ = ["ApiError", "ChatRequest", "parse_chat_request"]

log = logging.getLogger(__package__)  # one logger for the server: chatlora.serve


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

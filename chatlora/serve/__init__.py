"""Serve: an OpenAI-compatible chat API and a web chat page over one base model with several LoRA adapters.

One base model is loaded once; each adapter is loaded into it under its own name. Requests are batched
continuously (:class:`~chatlora.inference.engine.Engine`, in its own thread): a request joins the running rows at the
next token boundary, up to ``max_batch`` of them, and leaves as soon as its reply ends; requests for different
adapters and the base share the batch, each with its own sampling settings, seed, reply limit and stop strings,
streamed and cancelled on its own. At most
``max_batch + max_queue`` requests are admitted; later ones get 503 with ``Retry-After``. Prompts go through
:meth:`ChatModel.prompt_ids`, i.e. the training template, so served prompts are token-exact with training.

Hostile clients meet limits before they cost anything: the body size (413, checked on ``Content-Length`` before a
byte is read), the number of messages and a byte count against the context (400, before rendering), a deadline for
receiving a whole request and a cap on open connections (:class:`_Http`), and, without an API key, ``Host`` and
``Origin`` checks against DNS rebinding and cross-site requests (:class:`_Guard`). Rendering and tokenizing run in a
worker thread, so a slow one never stalls other requests.
"""

from ..settings import KEEP_ALIVE_S, MAX_BODY_BYTES, MAX_CONNECTIONS, MAX_MESSAGES, READ_TIMEOUT_S, ServeConfig
from .app import Admission, _add_error_handlers, create_app, run
from .guards import LOCAL_HOSTS, MAX_HEADER_BYTES, _add_guards, _bind, _server_config
from .models import ModelSet, ServedModel, load_models, parse_adapters
from .schema import ApiError, ChatRequest, parse_chat_request

__all__ = [
    "KEEP_ALIVE_S",
    "LOCAL_HOSTS",
    "MAX_BODY_BYTES",
    "MAX_CONNECTIONS",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGES",
    "READ_TIMEOUT_S",
    "Admission",
    "ApiError",
    "ChatRequest",
    "ModelSet",
    "ServeConfig",
    "ServedModel",
    "create_app",
    "load_models",
    "parse_adapters",
    "parse_chat_request",
    "run",
    # the app machinery another web app (chatlora.studio) builds on
    "_add_error_handlers",
    "_add_guards",
    "_bind",
    "_server_config",
]

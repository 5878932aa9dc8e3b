"""The HTTP guards in front of the app: ASGI middleware (API key, Host/Origin, body size and type, access log) and,
on uvicorn's h11 protocol, the request-head cap, the whole-request deadline and the connection cap.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import hmac
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Sequence
from http import HTTPStatus

import h11
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ConfigError
from ..settings import KEEP_ALIVE_S, MAX_CONNECTIONS, READ_TIMEOUT_S
from .schema import ApiError

__all__ = ["MAX_HEADER_BYTES"]

log = logging.getLogger(__package__)  # one logger for the server: chatlora.serve


# Defaults of the limits that are not flags; those that are live in chatlora.settings (ServeConfig).
MAX_HEADER_BYTES = 16 * 2**10  # a request's head: request line, headers and the blank line after them; else 431
LINGER_S = 2.0  # after refusing a request mid-upload: read and drop its rest this long, so the client sees why
LINGER_BYTES = 64 * 2**20
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


# ---------------------------------------------------------------- middleware


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
    """ASGI middleware: every call under ``prefix`` (``/v1/``) needs ``Authorization: Bearer KEY`` (constant-time
    compare)."""

    def __init__(self, app, key: bytes, prefix: str = "/v1/") -> None:
        self.app, self.key, self.prefix = app, key, prefix

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
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
    """ASGI middleware in front of the app: the body size cap (413), POSTs of ``media_types`` only (JSON: 415 for
    others) and, when ``hosts`` /
    ``origins`` are given, the ``Host`` and ``Origin`` checks (403) that stop DNS rebinding and cross-site requests.

    ``hosts``: names accepted besides IP addresses (a rebinding page needs a domain name, never an IP literal);
    ``None`` accepts any. ``origins``: glob patterns (``http://localhost:*``) accepted besides the server's own
    origin; ``None`` accepts any. A request without ``Origin`` (any non-browser client) passes.
    """

    def __init__(
        self,
        app,
        max_body_bytes: int,
        hosts: set[str] | None,
        origins: list[str] | None,
        media_types: Sequence[str] = ("application/json",),
    ) -> None:
        self.app, self.max_body_bytes, self.hosts, self.origins = app, max_body_bytes, hosts, origins
        self.media_types = tuple(media_types)

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
        if scope["method"] == "POST" and media not in self.media_types:
            wanted = " or ".join(f"'Content-Type: {m}'" for m in self.media_types)
            return ApiError(
                415,
                f"send the body {'as JSON ' if self.media_types == ('application/json',) else ''}with {wanted} "
                f"(got {media or 'none'!r})",
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


def _add_guards(
    app: FastAPI,
    key: bytes | None,
    allowed_hosts: Sequence[str],
    allowed_origins: Sequence[str],
    max_body_bytes: int,
    api_prefix: str = "/v1/",
    media_types: Sequence[str] = ("application/json",),
) -> None:
    """The middleware stack, innermost first: API key (on paths under ``api_prefix``), CORS, Host/Origin/size guard
    (POST bodies of ``media_types``), access log."""
    if key is not None:
        app.add_middleware(_Auth, key=key, prefix=api_prefix)
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
        media_types=media_types,
    )
    app.add_middleware(_AccessLog)  # outermost: refusals and 401s are logged too


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

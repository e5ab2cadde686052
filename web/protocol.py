"""HTTP the app never saw: malformed requests, slow clients, crowding clients.

aiohttp answers a request its parser refuses (oversized headers, a bad
method, broken chunking) itself, in plain text, and logs a traceback that
can quote the offending bytes, an Authorization header included. Its
`RequestHandler.handle_error` is the hook; reaching it takes a `Server`
that makes our handler and a runner that makes that server, both written
against aiohttp 3.14 (tests/web/test_protocol.py pins the behaviour).

The same handler gives each connection deadlines aiohttp has not (headers,
an idle body) and caps the connections one client holds open, so slow or
many connections (slowloris) cannot hold the server's.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import json
import logging
from collections import Counter
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from web.appkeys import settings_key
from web.errors import (
    MALFORMED_BODY_ERRORS,
    AppError,
    RateLimited,
    RequestTimeout,
    error_response,
)

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    405: "method_not_allowed",
    413: "payload_too_large",
    414: "bad_request",
    431: "bad_request",
    501: "not_implemented",
}
# What a client refused for holding too many connections is told to wait (s).
CROWDED_RETRY_S = 5
# How long a handler whose body timed out gets to send its 408 (seconds).
ANSWER_GRACE_S = 1.0


def protocol_error(status: int) -> AppError:
    """The contract's error for a request refused before any route saw it."""
    error = AppError(
        f"The request could not be read: {HTTPStatus(status).phrase.lower()}."
        if status < 500
        else "The server could not read the request."
    )
    error.status = status  # type: ignore[misc]
    error.code = _CODES.get(status, "bad_request" if status < 500 else "error")  # type: ignore[misc]
    return error


@dataclass(frozen=True)
class ConnectionLimits:
    """Deadlines of one connection (seconds) and connections per client."""

    # From the connection, or the first byte of a next request, to the end
    # of its headers: a slowloris trickles them.
    header_s: float
    # Longest wait for more of a body the handler expects.
    body_idle_s: float
    # Open connections one client may hold (per address; IPv6 per /64);
    # 0: no cap.
    per_client: int


def client_key(peername: object) -> str:
    """Whom a connection counts against: its address, an IPv6 one by /64
    (one host is given a whole /64), an IPv4-mapped one as IPv4."""
    if not isinstance(peername, tuple) or not peername:
        return "local"  # a Unix socket: one client, the host
    try:
        address = ipaddress.ip_address(str(peername[0]).partition("%")[0])
    except ValueError:
        return str(peername[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _crowded_answer(limit: int) -> bytes:
    """A whole HTTP 429 in the error format, written before any request is
    read: the connection is closed without reading one."""
    error = RateLimited(
        f"Too many connections from your address (at most {limit}); close some.",
        retry_after=CROWDED_RETRY_S,
    )
    body = json.dumps(error.body()).encode()
    head = (
        "HTTP/1.1 429 Too Many Requests\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {error.retry_after}\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class Phase(enum.Enum):
    """Where a connection is, for its deadline."""

    HEADERS = "headers"  # waiting for a request's headers: header_s from its start
    BODY = "body"  # a handler waits for the body: body_idle_s from the last byte
    BUSY = "busy"  # the request is read; the handler answers (no deadline)
    IDLE = "idle"  # between requests: aiohttp's keepalive_timeout applies


class ContractRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors as the API does,
    with deadlines for slow clients and a cap on connections per client.

    aiohttp does not document this class: the methods overridden here
    (connection_made/lost, data_received, finish_response, handle_error,
    log_exception) and when aiohttp calls them are those of 3.14, pinned by
    tests/web/test_protocol.py. No private attribute of it is read or set.
    """

    def __init__(
        self,
        manager: ContractServer,
        *,
        limits: ConnectionLimits,
        loop: asyncio.AbstractEventLoop,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        # Own names (`_sdapi_`): aiohttp's handler has many private attributes,
        # and it forgets its manager when the connection is lost.
        self._sdapi_server = manager
        self._sdapi_loop = loop
        self._sdapi_limits = limits
        self._sdapi_client: str | None = None
        self._sdapi_phase = Phase.HEADERS
        self._sdapi_deadline: asyncio.TimerHandle | None = None
        self._sdapi_body: StreamReader | None = None
        self._sdapi_pipelined = False

    # --- the connection's life -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        key = client_key(transport.get_extra_info("peername"))
        limit = self._sdapi_limits.per_client
        clients = self._sdapi_server.clients
        if limit and clients[key] >= limit:
            log.info("refused a connection from %s: %d open already", key, limit)
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_crowded_answer(limit))
            self.force_close()
            return
        clients[key] += 1
        self._sdapi_client = key
        self._arm(self._sdapi_limits.header_s, Phase.HEADERS)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        key, self._sdapi_client = self._sdapi_client, None
        if key is not None:
            clients = self._sdapi_server.clients
            clients[key] -= 1
            if clients[key] <= 0:
                del clients[key]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data and self._sdapi_phase is Phase.IDLE:
            self._arm(self._sdapi_limits.header_s, Phase.HEADERS)
        elif data and self._sdapi_phase is Phase.BUSY:
            # A pipelined request begins: its headers get their deadline once
            # this one is answered. (Bytes of it that came in the same packet
            # as this request go unseen: that one gets the keep-alive deadline.)
            self._sdapi_pipelined = True
        super().data_received(data)
        if self._sdapi_phase is Phase.BODY and data:
            body = self._sdapi_body
            if body is None or body.is_eof():
                self._busy()
            else:
                self._arm(self._sdapi_limits.body_idle_s, Phase.BODY)

    def request_began(self, message: RawRequestMessage, payload: StreamReader) -> None:
        """Its headers are read; the body (if any) is what is waited for now."""
        if message.upgrade or payload.is_eof():
            self._busy()
            return
        self._sdapi_body = payload
        self._arm(self._sdapi_limits.body_idle_s, Phase.BODY)

    async def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._sdapi_body = None
            if self._sdapi_pipelined:
                self._sdapi_pipelined = False
                self._arm(self._sdapi_limits.header_s, Phase.HEADERS)
            else:
                # aiohttp's keep-alive deadline runs from here.
                self._disarm()
                self._sdapi_phase = Phase.IDLE

    # --- deadlines -------------------------------------------------------------

    def _arm(self, seconds: float, phase: Phase) -> None:
        self._disarm()
        self._sdapi_phase = phase
        self._sdapi_deadline = self._sdapi_loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._sdapi_deadline is not None:
            self._sdapi_deadline.cancel()
            self._sdapi_deadline = None

    def _busy(self) -> None:
        self._disarm()
        self._sdapi_body = None
        self._sdapi_phase = Phase.BUSY

    def _expired(self) -> None:
        self._sdapi_deadline = None
        phase = self._sdapi_phase
        log.info(
            "closed a connection from %s: its %s did not arrive in time",
            self._sdapi_client,
            "request headers" if phase is Phase.HEADERS else "request body",
        )
        if phase is Phase.BODY and self._sdapi_body is not None:
            # The handler waiting for the body learns why and answers a 408 in
            # the error format; the connection ends after it, or after a grace
            # if the handler is not reading.
            self._sdapi_body.set_exception(RequestTimeout())
            self.close()
            self._sdapi_loop.call_later(ANSWER_GRACE_S, self.force_close)
            return
        self.force_close()

    # --- errors ----------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # One line, and only the exception's type: its text may quote the
        # request's bytes (a header value, a token).
        log.warning(
            "refused a malformed request from %s: %d %s",
            request.remote,
            status,
            type(exc).__name__ if exc is not None else "no exception",
        )
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already; closing")
        response = error_response(protocol_error(status))
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After answering a request whose body broke (bad gzip) or timed out,
        # aiohttp reads the rest of it, meets the same error and logs it as
        # unhandled: it was answered already (400, 408), one line suffices.
        exc = kw.get("exc_info")
        if isinstance(exc, (*MALFORMED_BODY_ERRORS, RequestTimeout)):
            log.info(
                "closed a connection after a malformed body (%s)", type(exc).__name__
            )
            return
        super().log_exception(*args, **kw)


class ContractServer(web.Server):
    """Makes `ContractRequestHandler`s (aiohttp's Server has no parameter for it)."""

    def __init__(
        self, server: web.Server, *, limits: ConnectionLimits, **kwargs: Any
    ) -> None:
        make_request = server.request_factory

        def request_factory(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: Any,
            task: asyncio.Task[None],
        ) -> BaseRequest:
            # The one point where a request's headers are known to be read.
            if isinstance(protocol, ContractRequestHandler):
                protocol.request_began(message, payload)
            return make_request(message, payload, protocol, writer, task)

        super().__init__(
            server.request_handler,
            request_factory=request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **kwargs,
        )
        self._handler_kwargs = kwargs
        self._limits = limits
        # Open connections per client_key.
        self.clients: Counter[str] = Counter()

    def __call__(self) -> RequestHandler:
        return ContractRequestHandler(
            self,
            limits=self._limits,
            loop=asyncio.get_running_loop(),
            **self._handler_kwargs,
        )


class ApiRunner(web.AppRunner):
    """An AppRunner whose connections answer protocol errors in our format and
    keep the deadlines and the per-client cap of the app's settings."""

    def __init__(
        self, app: web.Application, *, shutdown_timeout: float = 60.0, **kwargs: Any
    ) -> None:
        settings = app[settings_key]
        kwargs.setdefault("keepalive_timeout", settings.keepalive_timeout)
        super().__init__(app, shutdown_timeout=shutdown_timeout, **kwargs)
        # What AppRunner hands its Server (and so each connection's handler).
        self._server_kwargs = {"access_log_class": AccessLogger, **kwargs}
        self._limits = ConnectionLimits(
            header_s=settings.header_read_timeout,
            body_idle_s=settings.body_read_timeout,
            # Behind a proxy every connection comes from the proxy: it caps.
            per_client=0
            if settings.trust_forwarded
            else settings.max_connections_per_client,
        )

    # Private to AppRunner (the only way to make it build our Server); pinned
    # by tests/web/test_protocol.py.
    async def _make_server(self) -> web.Server:
        return ContractServer(
            await super()._make_server(), limits=self._limits, **self._server_kwargs
        )

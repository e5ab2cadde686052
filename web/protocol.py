"""HTTP the app never saw: malformed requests answered in the error format.

aiohttp answers a request its parser refuses (oversized headers, a bad
method, broken chunking) itself, in plain text, and logs a traceback that
can quote the offending bytes, an Authorization header included. Its
`RequestHandler.handle_error` is the hook; reaching it takes a `Server`
that makes our handler and a runner that makes that server, both written
against aiohttp 3.14 (tests/web/test_protocol.py pins the behaviour).
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from web.errors import AppError, error_response

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    405: "method_not_allowed",
    413: "payload_too_large",
    414: "bad_request",
    431: "bad_request",
    501: "not_implemented",
}


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


class ContractRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors as the API does."""

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


class ContractServer(web.Server):
    """Makes `ContractRequestHandler`s (aiohttp's Server has no parameter for it)."""

    def __init__(self, server: web.Server, **kwargs: Any) -> None:
        super().__init__(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **kwargs,
        )
        self._handler_kwargs = kwargs

    def __call__(self) -> RequestHandler:
        return ContractRequestHandler(
            self, loop=asyncio.get_running_loop(), **self._handler_kwargs
        )


class ApiRunner(web.AppRunner):
    """An AppRunner whose connections answer protocol errors in our format."""

    def __init__(
        self, app: web.Application, *, shutdown_timeout: float = 60.0, **kwargs: Any
    ) -> None:
        super().__init__(app, shutdown_timeout=shutdown_timeout, **kwargs)
        # What AppRunner hands its Server (and so each connection's handler).
        self._server_kwargs = {"access_log_class": AccessLogger, **kwargs}

    async def _make_server(self) -> web.Server:
        return ContractServer(await super()._make_server(), **self._server_kwargs)

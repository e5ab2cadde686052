"""Requests the parser refuses: in the error format, logged in one line."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from sdapi.devtools.net import free_port
from web.app import create_app
from web.protocol import ApiRunner
from web.settings import WebSettings

SECRET = "sdapi_NeverLogThisSecretValue"


@pytest.fixture
async def server(web_settings: WebSettings) -> AsyncIterator[int]:
    runner = ApiRunner(create_app(web_settings), access_log=None, shutdown_timeout=1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `data` as is; the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + SECRET.encode()
            + b"\r\nX-Big: "
            + b"a" * 20_000
            + b"\r\n\r\n",
            id="oversized-header",
        ),
        pytest.param(
            b"G(E)T /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + SECRET.encode()
            + b"\r\n\r\n",
            id="bad-method",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + SECRET.encode()
            + b"\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            id="conflicting-lengths",
        ),
        pytest.param(
            b"POST /api/v1/auth/signin HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked, identity\r\n\r\nzz\r\n",
            id="bad-chunking",
        ),
    ],
)
async def test_protocol_errors_are_in_the_error_format_and_logged_in_one_line(
    server: int, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    status, headers, body = await raw(server, request_bytes)
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/json")
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["code"] and error["message"]
    assert SECRET not in caplog.text
    refusals = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].exc_info is None
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_good_request_still_gets_through(server: int) -> None:
    status, _, body = await raw(
        server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200 and json.loads(body) == {"status": "ok"}

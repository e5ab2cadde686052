"""The connection level (web.protocol): requests the parser refuses, in the error
format and logged in one line; deadlines, the cap per client, a client that
leaves, a body that cannot be decoded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sdapi.devtools.accounts import make_user
from sdapi.devtools.net import free_port
from web.app import create_app
from web.appkeys import metrics_key
from web.protocol import ApiRunner, client_key
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


# --- slow and crowding clients ------------------------------------------------

Serve = Callable[..., Awaitable[tuple[int, web.Application]]]


@pytest.fixture
async def serve(web_settings: WebSettings) -> AsyncIterator[Serve]:
    """Start the app under ApiRunner with settings changed as given."""
    runners: list[web.AppRunner] = []

    async def start(**change: Any) -> tuple[int, web.Application]:
        app = create_app(web_settings.model_copy(update=change))
        runner = ApiRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        runners.append(runner)
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return port, app

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


async def closed_after(reader: asyncio.StreamReader, limit_s: float) -> bytes:
    """What the server sent until it closed the connection (within `limit_s`)."""
    return await asyncio.wait_for(reader.read(), timeout=limit_s)


@contextlib.asynccontextmanager
async def connection(
    port: int, source: str = "127.0.0.1"
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0)
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="silent"),
        pytest.param(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a", id="partial"),
    ],
)
async def test_connection_without_headers_is_closed_after_the_header_deadline(
    serve: Serve, sent: bytes
) -> None:
    port, _ = await serve(header_read_timeout=0.5, keepalive_timeout=60)
    loop = asyncio.get_running_loop()
    async with connection(port) as (reader, writer):
        started = loop.time()
        writer.write(sent)
        assert await closed_after(reader, 10) == b""
        assert loop.time() - started >= 0.4


async def test_idle_kept_alive_connection_is_closed_after_the_keepalive_deadline(
    serve: Serve,
) -> None:
    port, _ = await serve(header_read_timeout=60, keepalive_timeout=0.5)
    loop = asyncio.get_running_loop()
    async with connection(port) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert status_of(head) == 200
        started = loop.time()
        answer = await closed_after(reader, 10)
        assert json.loads(answer) == {"status": "ok"}
        assert loop.time() - started >= 0.4


async def test_short_body_is_a_408_and_closed_after_the_body_deadline(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    port, _ = await serve(body_read_timeout=0.5, header_read_timeout=60)
    loop = asyncio.get_running_loop()
    async with connection(port) as (reader, writer):
        writer.write(
            b"POST /api/v1/auth/signin HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 999999\r\n\r\n{"
        )
        started = loop.time()
        answer = await closed_after(reader, 10)
        assert loop.time() - started >= 0.4
    assert status_of(answer) == 408
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "request_timeout"
    assert not [r for r in caplog.records if r.exc_info]


async def test_oversized_declared_length_is_a_413_at_once(serve: Serve) -> None:
    port, _ = await serve(header_read_timeout=60, body_read_timeout=60)
    async with connection(port) as (reader, writer):
        writer.write(
            b"POST /api/v1/auth/signin HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: 99999999999\r\n\r\n{"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert status_of(head) == 413
        length = int(head.lower().partition(b"content-length:")[2].split(b"\r\n")[0])
        body = json.loads(await asyncio.wait_for(reader.readexactly(length), 5))
    assert body["error"]["code"] == "payload_too_large"


async def test_slowloris_connections_are_capped_closed_and_starve_nobody(
    serve: Serve,
) -> None:
    """200 slow connections (4 from each of 50 addresses, the cap) hold no
    one else off; a fifth from one address is refused; all are closed after
    the header deadline."""
    deadline_s = 5.0
    port, _ = await serve(
        header_read_timeout=deadline_s,
        max_connections_per_client=4,
        keepalive_timeout=60,
    )
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        slow = []
        opened = loop.time()
        for n in range(200):
            source = f"127.0.0.{2 + n // 4}"
            reader, writer = await stack.enter_async_context(connection(port, source))
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(reader)
        async with connection(port, "127.0.0.2") as (reader, _):
            refused = await closed_after(reader, 10)
        assert status_of(refused) == 429
        assert json.loads(refused.partition(b"\r\n\r\n")[2])["error"]["code"] == (
            "rate_limited"
        )
        status, _, body = await raw(
            port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status == 200 and json.loads(body) == {"status": "ok"}
        # ... while every slow one was still held.
        assert loop.time() - opened < deadline_s
        assert not [r for r in slow if r.at_eof()]
        answers = await asyncio.gather(*(closed_after(r, 30) for r in slow))
        assert answers == [b""] * 200
        assert loop.time() - opened >= deadline_s * 0.9


@pytest.mark.parametrize(
    ("peername", "key"),
    [
        (("203.0.113.7", 4000), "203.0.113.7"),
        (("2001:db8:1:2:aaaa::1", 4000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9", 4000, 0, 0), "2001:db8:1:2::/64"),
        (("::ffff:203.0.113.7", 4000, 0, 0), "203.0.113.7"),
        ("/run/sdapi.sock", "local"),
    ],
)
def test_connections_count_per_address_and_ipv6_per_64(
    peername: object, key: str
) -> None:
    assert client_key(peername) == key


async def test_client_disconnect_mid_body_is_a_499_not_an_outage(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port, app = await serve()
    async with connection(port) as (_, writer):
        writer.write(
            b"POST /api/v1/auth/signin HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"
        )
        await writer.drain()
    registry = app[metrics_key]
    labels = {"method": "POST", "route": "/api/v1/auth/signin"}

    def counted(status: str) -> float | None:
        return registry.get_sample_value(
            "sdapi_http_requests_total", {**labels, "status": status}
        )

    async with asyncio.timeout(10):
        while counted("499") is None:
            await asyncio.sleep(0.01)  # a poll of the condition, not a wait
    assert counted("499") == 1
    assert counted("503") is None
    gone = [r for r in caplog.records if "client went away" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO
    assert "unreachable" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        pytest.param("/api/v1/generations", "application/json", id="json"),
        pytest.param(
            "/api/v1/generations", "multipart/form-data; boundary=b", id="multipart"
        ),
        pytest.param("/api/v1/auth/signin", "application/json", id="signin"),
    ],
)
async def test_malformed_body_encoding_is_a_400_without_a_traceback(
    serve: Serve, caplog: pytest.LogCaptureFixture, path: str, content_type: str
) -> None:
    port, _ = await serve()
    _, secret = await make_user()
    body = b"\x1f\x8bnot gzip at all"
    status, _, answer = await raw(
        port,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
        f"Content-Type: {content_type}\r\nContent-Encoding: gzip\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body,
    )
    assert status == 400
    assert json.loads(answer)["error"]["code"] == "bad_request"
    assert not [r for r in caplog.records if r.exc_info]


async def test_websocket_outlives_the_connection_deadlines(serve: Serve) -> None:
    port, _ = await serve(
        header_read_timeout=0.2, body_read_timeout=0.2, keepalive_timeout=0.2
    )
    _, secret = await make_user()
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(
            f"http://127.0.0.1:{port}/api/v1/ws",
            headers={"Authorization": f"Bearer {secret}"},
        ) as ws,
    ):
        # Quiet for five times every deadline: nothing arrives, nothing closes.
        with pytest.raises(TimeoutError):
            await ws.receive(timeout=1.0)
        missing = "00000000-0000-0000-0000-000000000000"
        await ws.send_json({"type": "subscribe", "id": missing})
        answer = await ws.receive_json(timeout=10)
    assert answer["code"] == "not_found" and answer["id"] == missing

"""A real HTTP receiver for webhook tests: records each POST, answers as told."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook

# What the receiver does with a request: answer this status, or hang until
# `Receiver.release` is set and then answer 200.
HANG = "hang"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.body)
        return found

    def verify(self, secret: str) -> dict[str, Any]:
        """The payload, after standardwebhooks verified its signature."""
        found: dict[str, Any] = Webhook(secret).verify(self.body, self.headers)
        return found


@dataclass
class Receiver:
    url: str
    # Answers for the next requests, in order; then 200.
    script: list[int | str] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(Received(dict(request.headers), await request.read()))
        self.arrived.set()
        answer = self.script.pop(0) if self.script else 200
        if answer == HANG:
            await self.release.wait()
            answer = 200
        assert isinstance(answer, int)
        return web.Response(status=answer, text=f"answer {answer}")


@asynccontextmanager
async def receiver(path: str = "/hook") -> AsyncIterator[Receiver]:
    """A receiver listening on 127.0.0.1 (a loopback address: tests that send
    to it allow private addresses)."""
    app = web.Application()
    found = Receiver(url="")
    app.router.add_post(path, found.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    found.url = str(server.make_url(path))
    try:
        yield found
    finally:
        found.release.set()
        await server.close()

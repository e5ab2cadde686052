"""Pub/sub hints: one bad message does not end the subscription."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import redis.asyncio

from sdapi.infra.pubsub import Listener
from tests.support import until


async def test_a_failing_handler_does_not_stop_the_listener(
    redis_client: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []

    def handler(data: bytes) -> None:
        seen.append(data.decode())  # raises on bytes that are not UTF-8

    listener = Listener(redis_client, {"hints": handler})
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.subscribed.wait(), 5)
        await redis_client.publish("hints", b"\xff\xfe")
        await redis_client.publish("hints", b"still listening")
        await until(lambda: seen, 2, "the second message")
        assert seen == ["still listening"]
        assert not task.done()
        assert "pub/sub handler for hints failed" in caplog.text
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

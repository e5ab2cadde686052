"""The event publisher and the cancel watch, against a real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from gpu_node.progress import CancelWatch, EventPublisher
from sdapi.contract.events import StartedEvent
from sdapi.infra.streams import read_events


class _Unwritable:
    """An event that cannot be serialized (a bug, not a Redis failure)."""

    def model_dump_json(self) -> str:
        raise TypeError("not JSON")


async def test_a_bad_write_does_not_stop_the_publisher(
    redis_client: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = EventPublisher(redis_client)
    publisher.start()
    generation = str(uuid.uuid4())
    try:
        publisher.emit(generation, _Unwritable())  # type: ignore[arg-type]
        await asyncio.wait_for(publisher.flush(), 5)
        assert publisher.alive and publisher.dropped == 1
        publisher.emit(generation, StartedEvent(node_id="n"))
        await asyncio.wait_for(publisher.flush(), 5)
    finally:
        await publisher.close()
    assert [e for _, e in await read_events(redis_client, generation)] == [
        StartedEvent(node_id="n")
    ]
    assert "dropped 1 event(s)" in caplog.text


async def test_flush_fails_fast_when_the_publisher_is_gone(
    redis_client: redis.asyncio.Redis,
) -> None:
    publisher = EventPublisher(redis_client)
    with pytest.raises(RuntimeError, match="not running"):
        await asyncio.wait_for(publisher.flush(), 5)
    publisher.start()
    await publisher.close()
    assert not publisher.alive
    with pytest.raises(RuntimeError, match="not running"):
        await asyncio.wait_for(publisher.flush(), 5)


async def test_a_failed_watch_watches_nothing() -> None:
    # Nothing listens on port 1: the first read of the flags fails.
    unreachable = redis.asyncio.Redis(port=1, socket_connect_timeout=1)
    try:
        watch = CancelWatch(unreachable)
        with pytest.raises(RedisConnectionError):
            await watch.watch(["a", "b"])
        watch.note("a")
        assert watch.cancelled(["a", "b"]) == set()
        assert watch._watched == {}
    finally:
        await unreachable.aclose()

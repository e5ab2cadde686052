"""The event publisher and the cancel watch, against a real Redis."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from gpu_node.progress import CancelWatch, EventPublisher
from sdapi.contract.events import ImageEvent, ProgressEvent, StartedEvent
from sdapi.contract.names import IMAGE_TTL_S, image_key
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


async def test_events_from_the_pipeline_thread_arrive_whole_and_in_order(
    redis_client: redis.asyncio.Redis,
) -> None:
    # As a batch's steps do: bursts of events from another thread, one per
    # generation, while the loop also emits; wake-ups are coalesced, never
    # events.
    publisher = EventPublisher(redis_client)
    publisher.start()
    generations = [str(uuid.uuid4()) for _ in range(4)]

    def steps() -> None:
        for step in range(1, 51):
            for generation in generations:
                publisher.emit(generation, ProgressEvent(step=step, total=50))

    try:
        publisher.emit(generations[0], StartedEvent(node_id="n"))
        await asyncio.to_thread(steps)
        publisher.emit(generations[0], StartedEvent(node_id="again"))
        await asyncio.wait_for(publisher.flush(), 5)
    finally:
        await publisher.close()
    for generation in generations:
        events = [e for _, e in await read_events(redis_client, generation)]
        progress = [e.step for e in events if isinstance(e, ProgressEvent)]
        assert progress == list(range(1, 51))
        if generation == generations[0]:
            assert events[0] == StartedEvent(node_id="n")
            assert events[-1] == StartedEvent(node_id="again")
    assert publisher.dropped == 0


async def test_an_image_is_stored_with_its_event_after_the_progress_before_it(
    redis_client: redis.asyncio.Redis,
) -> None:
    publisher = EventPublisher(redis_client)
    publisher.start()
    generation = str(uuid.uuid4())
    key = image_key(generation, 0)
    event = ImageEvent(index=0, seed=1, width=8, height=8, sha256="a" * 64)
    try:
        publisher.emit(generation, ProgressEvent(step=20, total=20))
        assert await publisher.store_image(generation, key, b"first", event) is None
        # A second run of the generation: the first PNG stays, no event.
        again = event.model_copy(update={"sha256": "b" * 64})
        assert await publisher.store_image(generation, key, b"second", again) == (
            b"first"
        )
        await asyncio.wait_for(publisher.flush(), 5)
    finally:
        await publisher.close()
    assert await redis_client.get(key) == b"first"
    assert 0 < await redis_client.ttl(key) <= IMAGE_TTL_S
    assert [e for _, e in await read_events(redis_client, generation)] == [
        ProgressEvent(step=20, total=20),
        event,
    ]


async def test_an_image_that_cannot_be_stored_fails_its_caller() -> None:
    # Nothing listens on port 1: unlike an event, a PNG is not dropped quietly.
    unreachable = redis.asyncio.Redis(port=1, socket_connect_timeout=1)
    publisher = EventPublisher(unreachable)
    publisher.start()
    event = ImageEvent(index=0, seed=1, width=8, height=8, sha256="a" * 64)
    try:
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(
                publisher.store_image("g", image_key("g", 0), b"png", event), 10
            )
        assert publisher.alive
    finally:
        await publisher.close()
        await unreachable.aclose()

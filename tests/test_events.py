"""A generation's event stream: the single `done` event."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio
from redis.exceptions import ResponseError

from sdapi.contract.events import DoneEvent, StartedEvent
from sdapi.contract.names import EVENT_TTL_S, done_key, events_key
from sdapi.contract.payloads import ErrorInfo
from sdapi.contract.status import Status
from sdapi.infra.streams import append_done, append_event, read_events


async def test_done_is_appended_once(redis_client: redis.asyncio.Redis) -> None:
    generation = uuid.uuid4()
    await append_event(redis_client, generation, StartedEvent(node_id="n"))
    failed = DoneEvent(
        status=Status.FAILED, error=ErrorInfo(code="timeout", message="too slow")
    )
    assert await append_done(redis_client, generation, failed) is True
    assert (
        await append_done(redis_client, generation, DoneEvent(status=Status.CANCELLED))
        is False
    )
    events = [event for _, event in await read_events(redis_client, generation)]
    assert events == [StartedEvent(node_id="n"), failed]
    assert await redis_client.get(done_key(generation)) == b"failed"
    assert 0 < await redis_client.ttl(done_key(generation)) <= EVENT_TTL_S
    assert 0 < await redis_client.ttl(events_key(generation)) <= EVENT_TTL_S


async def test_a_failed_append_leaves_no_marker(
    redis_client: redis.asyncio.Redis,
) -> None:
    # The marker alone would make every retry believe `done` was written.
    generation = uuid.uuid4()
    await redis_client.set(events_key(generation), b"not a stream")
    done = DoneEvent(status=Status.SUCCEEDED)
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await append_done(redis_client, generation, done)
    assert not await redis_client.exists(done_key(generation))

    await redis_client.delete(events_key(generation))
    assert await append_done(redis_client, generation, done) is True
    assert [e for _, e in await read_events(redis_client, generation)] == [done]

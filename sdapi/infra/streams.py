"""Append to and read a generation's event stream (Redis streams)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast
from uuid import UUID

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from sdapi.contract.events import EVENT_ADAPTER, EVENT_FIELD, DoneEvent, Event
from sdapi.contract.names import EVENT_STREAM_MAXLEN, EVENT_TTL_S, done_key, events_key


async def append_event(redis: Redis, generation_id: UUID | str, event: Event) -> str:
    """Add `event` to the generation's stream and keep the stream alive."""
    return (await append_events(redis, [(generation_id, event)]))[0]


async def append_events(
    redis: Redis, events: Sequence[tuple[UUID | str, Event]]
) -> list[str]:
    """Add events (in order) to their generations' streams in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        add_events(pipe, events)
        for key in dict.fromkeys(events_key(gid) for gid, _ in events):
            pipe.expire(key, EVENT_TTL_S)
        replies = await pipe.execute()
    return [
        entry.decode() if isinstance(entry, bytes) else str(entry)
        for entry in replies[: len(events)]
    ]


def add_events(pipe: Pipeline, events: Sequence[tuple[UUID | str, Event]]) -> None:
    """Queue XADDs of `events` on a pipeline, in order (their TTL is the caller's).

    No MULTI/EXEC needed: each XADD is atomic, and entries of one stream keep
    the pipeline's order.
    """
    for generation_id, event in events:
        pipe.xadd(
            events_key(generation_id),
            {EVENT_FIELD: event.model_dump_json()},
            maxlen=EVENT_STREAM_MAXLEN,
            approximate=True,
        )


# The marker and the event go together: SET NX, then XADD + EXPIRE only when
# the marker was set; if the XADD fails (the key holds another type, Redis is
# out of memory) the marker is deleted again, so a retry can still append.
# One script: no client can die between the two writes.
_APPEND_DONE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  return 0
end
local added = redis.pcall(
  'XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', ARGV[4], ARGV[5])
if type(added) == 'table' and added.err then
  redis.call('DEL', KEYS[1])
  return added
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


async def append_done(
    redis: Redis, generation_id: UUID | str, event: DoneEvent
) -> bool:
    """Append the generation's one `done` event; False if it was already there."""
    script = redis.register_script(_APPEND_DONE)
    added = await script(
        keys=[done_key(generation_id), events_key(generation_id)],
        args=[
            event.status.value,
            EVENT_TTL_S,
            EVENT_STREAM_MAXLEN,
            EVENT_FIELD,
            event.model_dump_json(),
        ],
    )
    return bool(added)


def decode_entry(fields: dict[bytes, bytes]) -> Event:
    """The event stored in one stream entry."""
    return EVENT_ADAPTER.validate_json(fields[EVENT_FIELD.encode()])


async def read_events(
    redis: Redis,
    generation_id: UUID | str,
    after: str = "0",
    *,
    block_ms: int | None = None,
    count: int = 500,
) -> list[tuple[str, Event]]:
    """Events after entry id `after`, waiting up to `block_ms` for the first one."""
    key = events_key(generation_id)
    if block_ms is None:
        raw = await redis.xrange(
            key, min=f"({after}" if after != "0" else "-", count=count
        )
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], raw)
    else:
        reply = await redis.xread({key: after}, count=count, block=block_ms)
        entries = reply[0][1] if reply else []
    return [(entry_id.decode(), decode_entry(fields)) for entry_id, fields in entries]


async def latest_events(
    redis: Redis, generation_id: UUID | str, *, count: int
) -> list[tuple[str, Event]]:
    """The newest `count` events, newest first (entry ids carry Redis's time)."""
    raw = await redis.xrevrange(events_key(generation_id), count=count)
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], raw)
    return [(entry_id.decode(), decode_entry(fields)) for entry_id, fields in entries]

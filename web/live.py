"""Following a generation's events, replayed then live, and their frames.

Events live in a Redis stream (`sdapi.infra.streams`); `follow` replays it,
waits on it until `done`, and tells the rest from the database once the
stream is gone. The WebSocket (`web.live_socket`) and the OpenAI route use it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sdapi.contract.events import (
    DoneEvent,
    Event,
    ImageEvent,
    LoadingModelEvent,
    ProgressEvent,
    QueuedEvent,
    StartedEvent,
)
from sdapi.contract.status import Status
from sdapi.db.models import Generation
from sdapi.infra.eta import Eta
from sdapi.infra.object_store import ObjectMissing, StoreUnavailable
from sdapi.infra.streams import read_events
from web.appkeys import live_redis_key
from web.generation_views import (
    eta_fields,
    event_png,
    image_url,
    stored_images,
)
from web.schemas.generations import ErrorRef
from web.schemas.live import (
    DoneFrame,
    ErrorFrame,
    ImageFrame,
    LoadingModelFrame,
    ProgressFrame,
    QueuedFrame,
    ServerFrame,
    StartedFrame,
)

log = logging.getLogger(__name__)

# How long one blocking XREAD waits before the database is asked whether the
# generation finished without its `done` reaching the stream (milliseconds).
BLOCK_MS = 5000
# Pause before reading again while Redis is unreachable (seconds).
REDIS_RETRY_S = 1.0
# Retry-After of a WebSocket upgrade refused for too many open sockets, and
# of a subscription refused for too many followed generations (seconds).
SOCKET_RETRY_S = 10


# --- following a generation --------------------------------------------------


async def _finished_in_database(
    generation_id: uuid.UUID, seen_images: set[int]
) -> list[Event]:
    """The remaining events of a finished generation, from its row; [] if not."""
    row = await Generation.get_or_none(id=generation_id)
    done = None if row is None else row.done_event()
    if done is None:
        return []
    events: list[Event] = []
    if done.status is Status.SUCCEEDED:
        images = (await stored_images([generation_id])).get(generation_id, [])
        events.extend(
            ImageEvent(
                index=image.index,
                seed=image.seed,
                width=image.width,
                height=image.height,
                sha256=image.sha256,
            )
            for image in images
            if image.index not in seen_images
        )
    events.append(done)
    return events


class Feed:
    """A generation's events as this process has read them, shared by every
    follower here: one blocking read at a time per generation, however many
    sockets follow it."""

    def __init__(self, redis: Redis, generation_id: uuid.UUID, block_ms: int) -> None:
        self.entries: list[Event] = []
        # Completed reads, empty ones included: a follower that sees one and
        # no new entry asks the database whether the generation has ended.
        self.reads = 0
        self.followers = 0
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(
            self._read(redis, generation_id, block_ms), name=f"feed-{generation_id}"
        )

    async def _read(
        self, redis: Redis, generation_id: uuid.UUID, block_ms: int
    ) -> None:
        after = "0"
        # The first read does not block: a finished generation whose stream
        # has expired is then told from the database at once.
        wait: int | None = None
        while True:
            try:
                entries = await read_events(redis, generation_id, after, block_ms=wait)
            except RedisError:
                log.warning("reading the events of %s failed; retrying", generation_id)
                await asyncio.sleep(REDIS_RETRY_S)
                entries = []
            except Exception:
                # A bad entry must not leave every follower waiting forever:
                # they fall back to the database at the next empty read.
                log.exception("reading the events of %s failed", generation_id)
                await asyncio.sleep(REDIS_RETRY_S)
                entries = []
            wait = block_ms
            async with self._changed:
                for entry_id, event in entries:
                    after = entry_id
                    self.entries.append(event)
                self.reads += 1
                self._changed.notify_all()
            if any(isinstance(event, DoneEvent) for _, event in entries):
                return

    async def wait(self, seen: int, reads: int) -> None:
        """Until there are more than `seen` entries, or another read ended."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: len(self.entries) > seen or self.reads > reads
            )

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# This process's open feeds, by generation.
feeds_key: web.AppKey[dict[uuid.UUID, Feed]] = web.AppKey("feeds")


@contextlib.asynccontextmanager
async def shared_feed(
    app: web.Application, generation_id: uuid.UUID
) -> AsyncIterator[Feed]:
    """This process's feed of a generation, opened by its first follower and
    closed after its last."""
    feeds = app[feeds_key]
    feed = feeds.get(generation_id)
    if feed is None:
        feed = feeds[generation_id] = Feed(app[live_redis_key], generation_id, BLOCK_MS)
    feed.followers += 1
    try:
        yield feed
    finally:
        feed.followers -= 1
        if feed.followers == 0:
            del feeds[generation_id]
            await feed.close()


async def follow(
    app: web.Application, generation_id: uuid.UUID
) -> AsyncGenerator[Event, None]:
    """Every event of a generation, replayed then live, ending with its `done`."""
    seen_images: set[int] = set()
    async with shared_feed(app, generation_id) as feed:
        seen, reads = 0, 0
        while True:
            await feed.wait(seen, reads)
            reads = feed.reads
            if len(feed.entries) == seen:
                for event in await _finished_in_database(generation_id, seen_images):
                    yield event
                    if isinstance(event, DoneEvent):
                        return
                continue
            for event in feed.entries[seen:]:
                seen += 1
                if isinstance(event, ImageEvent):
                    seen_images.add(event.index)
                yield event
                if isinstance(event, DoneEvent):
                    return


async def wait_until_done(app: web.Application, generation_id: uuid.UUID) -> DoneEvent:
    """Follow a generation until its `done` event (the caller bounds the time)."""
    async with contextlib.aclosing(follow(app, generation_id)) as events:
        async for event in events:
            if isinstance(event, DoneEvent):
                return event
    # `follow` only ends after a `done`.
    raise RuntimeError(f"the events of {generation_id} ended without `done`")


def done_frame(ident: str, status: Status, error: ErrorRef | None) -> DoneFrame:
    """The `done` frame; the error goes along only when the generation failed."""
    return DoneFrame(
        id=ident,
        status=status,
        error=error if status is Status.FAILED else None,
    )


async def event_frame(
    app: web.Application, generation_id: uuid.UUID, event: Event
) -> ServerFrame:
    """The WebSocket frame of one event (an image frame carries its PNG)."""
    ident = str(generation_id)
    if isinstance(event, QueuedEvent):
        known = event.wait_s is not None and event.run_s is not None
        eta_s, eta = eta_fields(
            Eta(event.wait_s or 0.0, event.run_s or 0.0) if known else None
        )
        return QueuedFrame(
            id=ident,
            position=event.position,
            waiting_for_node=event.waiting_for_node,
            eta_s=eta_s,
            eta=eta,
        )
    if isinstance(event, LoadingModelEvent):
        return LoadingModelFrame(id=ident, model=event.model)
    if isinstance(event, StartedEvent):
        return StartedFrame(id=ident, load_s=event.load_s, eta_s=event.eta_s)
    if isinstance(event, ProgressEvent):
        return ProgressFrame(
            id=ident, step=event.step, total=event.total, preview=event.preview
        )
    if isinstance(event, ImageEvent):
        try:
            data = await event_png(app, generation_id, event.index, event.sha256)
        except (StoreUnavailable, ObjectMissing):
            # The frame's `url` still gets it once the store answers again.
            data = None
        if data is None:
            return ErrorFrame(
                id=ident,
                code="image_unavailable",
                message=f"Image {event.index} is no longer available.",
            )
        return ImageFrame(
            id=ident,
            index=event.index,
            seed=event.seed,
            url=image_url(app, generation_id, event.index),
            data=base64.b64encode(data).decode("ascii"),
        )
    error = event.error
    return done_frame(
        ident,
        event.status,
        ErrorRef(code=error.code, message=error.message) if error else None,
    )


# --- WebSockets --------------------------------------------------------------

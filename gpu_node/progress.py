"""Progress of running generations: events to Redis, cancel flags from Redis.

The pipeline thread never waits on the event loop: it hands events over with
`loop.call_soon_threadsafe` to a queue that one publisher task drains in
order. Cancel flags are read on the pipeline thread itself with a tiny
synchronous MGET per step, so a cancel stops the work within one step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import redis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gpu_node.executor import GpuExecutor
from gpu_node.schemas import EVENT_TTL_S, Event, ProgressEvent, cancel_key, progress_key
from gpu_node.work import CallStopped
from sdapi.events import append_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Append:
    generation_id: str
    event: Event


@dataclass(frozen=True)
class _Progress:
    generation_id: str
    step: int
    total: int


@dataclass(frozen=True)
class _Flush:
    done: asyncio.Future[None]


_STOP = object()


class EventPublisher:
    """Appends events to each generation's stream, in the order they were emitted."""

    def __init__(self, redis_client: Redis) -> None:
        self._redis = redis_client
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def start(self) -> None:
        """Start the task that drains the queue."""
        self._task = self._loop.create_task(self._drain(), name="event-publisher")

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _put(self, item: object) -> None:
        # On the loop, queue at once so that order follows the code; from the
        # pipeline thread, hop over without waiting.
        if self._on_loop():
            self._queue.put_nowait(item)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nothing to tell
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def emit(self, generation_id: str, event: Event) -> None:
        """Queue `event` for the generation's stream (from any thread, never blocks)."""
        self._put(_Append(generation_id, event))
        if isinstance(event, ProgressEvent):
            self._put(_Progress(generation_id, event.step, event.total))

    def set_progress(self, generation_id: str, step: int, total: int) -> None:
        """Queue an update of the generation's progress hash (REST status)."""
        self._put(_Progress(generation_id, step, total))

    async def flush(self) -> None:
        """Wait until everything emitted so far is in Redis (or given up on)."""
        done: asyncio.Future[None] = self._loop.create_future()
        self._queue.put_nowait(_Flush(done))
        await done

    async def close(self) -> None:
        """Publish what is queued, then stop; never cancelled (no step gets lost)."""
        if self._task is None:
            return
        self._queue.put_nowait(_STOP)
        await self._task
        self._task = None

    async def _drain(self) -> None:
        # Progress-hash writes wait until the queue runs dry and keep only the
        # last step of each generation: REST polls the hash, it needs no history.
        progress: dict[str, _Progress] = {}
        while True:
            if progress and self._queue.empty():
                await self._write_progress(progress)
            item = await self._queue.get()
            if isinstance(item, _Progress):
                progress[item.generation_id] = item
            elif isinstance(item, _Append):
                try:
                    await append_event(self._redis, item.generation_id, item.event)
                except (RedisError, OSError) as exc:
                    # Progress is best effort: the result itself travels via arq.
                    self.dropped += 1
                    log.warning("dropped an event of %s: %s", item.generation_id, exc)
            else:
                await self._write_progress(progress)
                if isinstance(item, _Flush) and not item.done.done():
                    item.done.set_result(None)
                if item is _STOP:
                    return

    async def _write_progress(self, progress: dict[str, _Progress]) -> None:
        if not progress:
            return
        items = list(progress.values())
        progress.clear()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for item in items:
                    key = progress_key(item.generation_id)
                    pipe.hset(key, mapping={"step": item.step, "total": item.total})
                    pipe.expire(key, EVENT_TTL_S)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.dropped += len(items)
            log.warning("dropped progress of %d generation(s): %s", len(items), exc)


class CancelChecker:
    """Reads cancel flags synchronously, from the pipeline thread only."""

    # After a Redis error, skip checks this long (seconds) rather than stall
    # every step on a connection timeout.
    BACKOFF_S = 1.0

    def __init__(self, url: str, timeout_s: float = 0.25) -> None:
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._quiet_until = 0.0

    def cancelled(self, generation_ids: Sequence[str]) -> set[str]:
        """The ids among `generation_ids` whose cancel flag is set."""
        if not generation_ids or time.monotonic() < self._quiet_until:
            return set()
        try:
            values: list[bytes | None] = list(
                self._client.mget([cancel_key(gid) for gid in generation_ids])  # type: ignore[arg-type]
            )
        except (RedisError, OSError) as exc:
            self._quiet_until = time.monotonic() + self.BACKOFF_S
            log.warning("cannot read cancel flags: %s", exc)
            return set()
        return {gid for gid, value in zip(generation_ids, values, strict=True) if value}

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


def preview_url(jpeg: bytes | None) -> str | None:
    """A JPEG as a data: URL."""
    if jpeg is None:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class CallObserver:
    """Publishes a call's steps, applies cancels, and yields to premium work."""

    def __init__(
        self,
        keys: Sequence[str],
        publisher: EventPublisher,
        checker: CancelChecker,
        *,
        preview_every: int,
        executor: GpuExecutor | None = None,
        on_step_done: Callable[[int], None] | None = None,
    ) -> None:
        self.keys = list(dict.fromkeys(keys))
        self.cancelled: set[str] = set()
        self.abort = threading.Event()
        self.steps_done = 0
        self._publisher = publisher
        self._checker = checker
        self._preview_every = preview_every
        self._executor = executor
        self._on_step_done = on_step_done

    @property
    def active(self) -> list[str]:
        return [key for key in self.keys if key not in self.cancelled]

    def _check(self) -> None:
        if self.abort.is_set():
            raise CallStopped("aborted")
        self.cancelled |= self._checker.cancelled(self.active)
        if not self.active:
            raise CallStopped("cancelled")

    def before_start(self) -> None:
        """Stop before the call starts if it was aborted or all of it cancelled."""
        self._check()

    def preview_keys(self, step: int) -> Sequence[str]:
        """Items that get a preview after `step`."""
        if self._preview_every <= 0 or step % self._preview_every:
            return []
        return self.active

    def on_step(self, step: int, total: int, previews: Mapping[str, bytes]) -> None:
        """Check cancels, publish progress, then let waiting premium work run."""
        self._check()
        self.steps_done += 1
        for key in self.active:
            self._publisher.emit(
                key,
                ProgressEvent(
                    step=step, total=total, preview=preview_url(previews.get(key))
                ),
            )
        if self._on_step_done is not None:
            self._on_step_done(step)
        if self._executor is not None:
            self._executor.run_pending_premium()

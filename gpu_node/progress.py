"""Progress of running generations: events to Redis, cancel flags from Redis.

The pipeline thread never waits on the event loop: it appends events to a
locked list that one publisher task drains in order, and wakes that task at
most once until it has run (a wake-up makes the loop thread take the GIL from
the pipeline thread; a batch's step emits one event per image). Cancel
flags are kept on the loop (pub/sub messages plus re-reads) in a set the
pipeline thread checks at every step without I/O.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gpu_node.calls import CallStopped
from gpu_node.executor import GpuExecutor
from sdapi.contract.events import EVENT_FIELD, Event, ImageEvent, ProgressEvent
from sdapi.contract.names import (
    EVENT_STREAM_MAXLEN,
    EVENT_TTL_S,
    IMAGE_TTL_S,
    cancel_key,
    events_key,
    progress_key,
)
from sdapi.infra.streams import add_events

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
    # Unix time of this step, and of the job's start on the first update: the
    # job's own rate for its estimated time (`web.eta`), in the node's clock.
    at: float = field(default_factory=time.time)
    started: float | None = None


@dataclass(frozen=True)
class _Flush:
    done: asyncio.Future[None]


@dataclass(frozen=True)
class _StoreImage:
    generation_id: str
    key: str
    png: bytes
    event: ImageEvent
    # The PNG that was at `key` already (nothing appended), or None.
    done: asyncio.Future[bytes | None]


# The node's PNG and its `image` event in one step: SET NX, then the event
# only if this PNG is the one kept; else the kept PNG comes back (its TTL
# renewed) and the caller describes that one. One script, so the event can
# never name bytes other than those at the key.
_STORE_IMAGE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', ARGV[4], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  return false
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return redis.call('GET', KEYS[1])
"""


_STOP = object()


class EventPublisher:
    """Appends events to each generation's stream, in the order they were emitted.

    Everything queued when the publisher gets to run goes to Redis in one
    pipelined round trip, so a step costs one hop from the pipeline thread and
    at most one round trip. The progress hash (what REST shows) keeps only the
    latest step and is written at most every `progress_every_s`, and at every
    flush; a stream's TTL is renewed once per `renew_every_s`.
    """

    def __init__(
        self,
        redis_client: Redis,
        *,
        progress_every_s: float = 0.5,
        renew_every_s: float = 60.0,
    ) -> None:
        self._redis = redis_client
        self._loop = asyncio.get_running_loop()
        # What was emitted and not drained yet, in emission order (any thread).
        self._lock = threading.Lock()
        self._pending: list[object] = []
        # A wake-up of the drain is on its way: later emits only append.
        self._wake_due = False
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._progress_every_s = progress_every_s
        self._renew_every_s = renew_every_s
        self._progress: dict[str, _Progress] = {}
        self._progress_written = 0.0
        self._renewed: dict[str, float] = {}
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
        with self._lock:
            self._pending.append(item)
            if self._wake_due:
                return
            self._wake_due = True
        if self._on_loop():
            self._ready.set()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nothing to tell
            self._loop.call_soon_threadsafe(self._ready.set)

    def emit(self, generation_id: str, event: Event) -> None:
        """Queue `event` for the generation's stream (from any thread, never blocks)."""
        self._put(_Append(generation_id, event))

    def set_progress(
        self, generation_id: str, step: int, total: int, *, started: bool = False
    ) -> None:
        """Queue an update of the generation's progress hash (REST status);
        `started`: the job starts now (its time is kept for its rate)."""
        now = time.time()
        self._put(_Progress(generation_id, step, total, now, now if started else None))

    @property
    def alive(self) -> bool:
        """Whether the draining task runs (a node without it cannot deliver)."""
        return self._task is not None and not self._task.done()

    async def flush(self) -> None:
        """Wait until everything emitted so far is in Redis (or given up on)."""
        task = self._task
        if task is None or task.done():
            raise RuntimeError("the event publisher is not running")
        done: asyncio.Future[None] = self._loop.create_future()
        self._put(_Flush(done))
        # Wait for the task too: if it died, nobody would ever answer the flush.
        await asyncio.wait({done, task}, return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            done.cancel()
            raise RuntimeError("the event publisher stopped")

    async def store_image(
        self, generation_id: str, key: str, png: bytes, event: ImageEvent
    ) -> bytes | None:
        """Store `png` at `key` unless a PNG is there, with `event` (which
        describes it) appended after everything emitted so far, in the same
        round trip as they are; the PNG already there (nothing appended), or
        None. Unlike events, a failure raises (RedisError)."""
        task = self._task
        if task is None or task.done():
            raise RuntimeError("the event publisher is not running")
        done: asyncio.Future[bytes | None] = self._loop.create_future()
        self._put(_StoreImage(generation_id, key, png, event, done))
        waiting: set[asyncio.Future[Any]] = {done, task}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Nobody reads its outcome now: the drain skips a done future.
            done.cancel()
            raise
        if not done.done():
            done.cancel()
            raise RuntimeError("the event publisher stopped")
        return done.result()

    async def close(self) -> None:
        """Publish what is queued, then stop; never cancelled (no step gets lost)."""
        if self._task is None:
            return
        self._put(_STOP)
        await self._task
        self._task = None

    async def _drain(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            with self._lock:
                items, self._pending = self._pending, []
                self._wake_due = False
            appends: list[_Append | _StoreImage] = []
            for item in items:
                if isinstance(item, _Append):
                    appends.append(item)
                    if isinstance(item.event, ProgressEvent):
                        self._note_progress(item.generation_id, item.event)
                elif isinstance(item, _StoreImage):
                    appends.append(item)
                elif isinstance(item, _Progress):
                    self._set(item)
                else:
                    # A flush or stop: after everything emitted before it.
                    await self._write(appends, force_progress=True)
                    appends = []
                    if isinstance(item, _Flush) and not item.done.done():
                        item.done.set_result(None)
                    if item is _STOP:
                        return
            await self._write(appends, force_progress=False)

    def _set(self, update: _Progress) -> None:
        # A start not written yet stays with the updates that replace it.
        old = self._progress.get(update.generation_id)
        if old is not None and old.started is not None and update.started is None:
            update = _Progress(
                update.generation_id, update.step, update.total, update.at, old.started
            )
        self._progress[update.generation_id] = update

    def _note_progress(self, generation_id: str, event: ProgressEvent) -> None:
        self._set(_Progress(generation_id, event.step, event.total))

    async def _write(
        self, appends: list[_Append | _StoreImage], *, force_progress: bool
    ) -> None:
        now = time.monotonic()
        progress: list[_Progress] = []
        if self._progress and (
            force_progress or now - self._progress_written >= self._progress_every_s
        ):
            progress = list(self._progress.values())
            self._progress.clear()
            self._progress_written = now
        if not appends and not progress:
            return
        renew = []
        for item in appends:
            if isinstance(item, _StoreImage):
                continue  # the script renews its stream
            key = events_key(item.generation_id)
            if now - self._renewed.get(key, -1e9) >= self._renew_every_s:
                self._renewed[key] = now
                renew.append(key)
        if len(self._renewed) > 10_000:
            horizon = now - self._renew_every_s
            self._renewed = {k: t for k, t in self._renewed.items() if t >= horizon}
        stores = [item for item in appends if isinstance(item, _StoreImage)]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                # In emission order: an image's event follows what came before.
                for item in appends:
                    if isinstance(item, _Append):
                        add_events(pipe, [(item.generation_id, item.event)])
                    else:
                        pipe.execute_command(
                            "EVAL",
                            _STORE_IMAGE,
                            2,
                            item.key,
                            events_key(item.generation_id),
                            item.png,
                            IMAGE_TTL_S,
                            EVENT_STREAM_MAXLEN,
                            EVENT_FIELD,
                            item.event.model_dump_json(),
                            EVENT_TTL_S,
                        )
                for key in renew:
                    pipe.expire(key, EVENT_TTL_S)
                for update in progress:
                    key = progress_key(update.generation_id)
                    fields: dict[str, float] = {
                        "step": update.step,
                        "total": update.total,
                        "at": update.at,
                    }
                    if update.started is not None:
                        fields["t0"] = update.started
                    pipe.hset(key, mapping=fields)
                    pipe.expire(key, EVENT_TTL_S)
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            # Progress is best effort: the result itself travels via arq. A
            # PNG is not: its caller fails (and the job is run again).
            for store in stores:
                if not store.done.done():
                    store.done.set_exception(exc)
            self.dropped += len(appends) - len(stores) + len(progress)
            log.warning(
                "dropped %d event(s) and %d progress update(s): %s",
                len(appends) - len(stores),
                len(progress),
                exc,
            )
            return
        except Exception:
            # Anything else is a bug, but it must not end the one task every
            # later flush() waits on.
            for store in stores:
                if not store.done.done():
                    store.done.set_exception(RuntimeError("storing the PNG failed"))
            self.dropped += len(appends) - len(stores) + len(progress)
            log.exception(
                "dropped %d event(s) and %d progress update(s)",
                len(appends) - len(stores),
                len(progress),
            )
            return
        for item, reply in zip(appends, replies, strict=False):
            if isinstance(item, _StoreImage) and not item.done.done():
                item.done.set_result(reply if isinstance(reply, bytes) else None)


class CancelWatch:
    """Cancel flags of the generations this node is working on.

    Kept on the event loop from `CANCEL_CHANNEL` messages, from a read of the
    flags when work starts, and from a re-read every `recheck_s` (a message
    published while the subscription reconnects is lost). The pipeline thread
    asks at every step without any I/O, so a cancel stops work within a step.
    """

    def __init__(self, redis_client: Redis, *, recheck_s: float = 1.0) -> None:
        self._redis = redis_client
        self._recheck_s = recheck_s
        self._lock = threading.Lock()
        self._watched: dict[str, int] = {}
        self._cancelled: set[str] = set()

    def note(self, generation_id: str) -> None:
        """A cancel message arrived (from the listener, on the loop)."""
        with self._lock:
            if generation_id in self._watched:
                self._cancelled.add(generation_id)

    async def watch(self, generation_ids: Sequence[str]) -> set[str]:
        """Follow these generations' flags; return those already cancelled."""
        with self._lock:
            for gid in generation_ids:
                self._watched[gid] = self._watched.get(gid, 0) + 1
        # Read after watching: a cancel from now on is caught by `note` too.
        try:
            await self._read(list(generation_ids))
        except BaseException:
            # The caller's unwatch never runs when watch itself fails.
            self.unwatch(generation_ids)
            raise
        return self.cancelled(generation_ids)

    def unwatch(self, generation_ids: Sequence[str]) -> None:
        """Stop following these generations."""
        with self._lock:
            for gid in generation_ids:
                left = self._watched.get(gid, 0) - 1
                if left > 0:
                    self._watched[gid] = left
                else:
                    self._watched.pop(gid, None)
                    self._cancelled.discard(gid)

    def cancelled(self, generation_ids: Sequence[str]) -> set[str]:
        """The ids among `generation_ids` that are cancelled (any thread, no I/O)."""
        with self._lock:
            return {gid for gid in generation_ids if gid in self._cancelled}

    async def _read(self, generation_ids: list[str]) -> None:
        if not generation_ids:
            return
        values = await self._redis.mget([cancel_key(gid) for gid in generation_ids])
        for gid, value in zip(generation_ids, values, strict=True):
            if value:
                self.note(gid)

    async def run(self) -> None:
        """Re-read the watched flags every `recheck_s` until cancelled."""
        while True:
            await asyncio.sleep(self._recheck_s)
            with self._lock:
                watched = [g for g in self._watched if g not in self._cancelled]
            try:
                await self._read(watched)
            except (RedisError, OSError) as exc:
                log.warning("cannot re-read cancel flags: %s", exc)


def preview_url(jpeg: bytes | None) -> str | None:
    """A JPEG as a data: URL."""
    if jpeg is None:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


class ItemProgress:
    """One generation's progress across the pipeline calls that make its images.

    A generation's images may take several calls (split by the node's batch
    size, or again after running out of memory), and a scheduler may run
    more denoising iterations than the requested steps (PNDM: one more).
    Progress is reported in the generation's own steps (`total` = steps),
    as the fraction of its planned calls done, and never goes backwards.
    """

    def __init__(self, steps: int, calls: int = 1) -> None:
        self.total = steps
        self.calls = calls
        self.calls_done = 0
        self.reported = 0

    def position(self, step: int, call_total: int) -> int:
        """The generation's step after `step` of `call_total` of its current call."""
        # Integer arithmetic: step == call_total == steps gives exactly steps.
        done = self.calls_done * call_total + min(step, call_total)
        return min(self.total, done * self.total // (self.calls * call_total))

    def resplit(self, pieces: int) -> None:
        """Its current call was split into `pieces` calls (out of memory)."""
        self.calls += pieces - 1

    def call_done(self) -> None:
        """One of its calls finished."""
        self.calls_done += 1


class CallObserver:
    """Publishes a call's steps, applies cancels, and yields to premium work."""

    def __init__(
        self,
        progress: Mapping[str, ItemProgress],
        publisher: EventPublisher,
        cancels: CancelWatch,
        *,
        preview_every: int,
        min_interval_s: float = 0.0,
        executor: GpuExecutor | None = None,
        on_step_done: Callable[[int], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.keys = list(progress)
        self.cancelled: set[str] = set()
        # Set from the loop when the job's time is up or it was cancelled.
        self.abort = threading.Event()
        # Set by the job when it lost its claim: another node runs it now.
        self.stop = stop if stop is not None else threading.Event()
        self.steps_done = 0
        # Seconds between step callbacks after the first, without nested
        # premium work: what a step takes (the node learns its speed from it).
        self.step_seconds = 0.0
        self.timed_steps = 0
        self._step_mark: float | None = None
        # Seconds spent running nested premium calls (the batch's time limit
        # does not count them).
        self.yielded_s = 0.0
        self._progress = progress
        self._publisher = publisher
        self._cancels = cancels
        self._preview_every = preview_every
        self._min_interval_s = min_interval_s
        self._executor = executor
        self._on_step_done = on_step_done
        # Progress goes out at most every `min_interval_s` (a generation's
        # last step always): faster than a person can see, it only costs the
        # GPU node, Redis and every relay on the way.
        self._last_emit = -1e9
        self._last_preview_step = 0

    @property
    def active(self) -> list[str]:
        return [key for key in self.keys if key not in self.cancelled]

    def _check(self) -> None:
        if self.abort.is_set() or self.stop.is_set():
            raise CallStopped("aborted")
        self.cancelled |= self._cancels.cancelled(self.active)
        if not self.active:
            raise CallStopped("cancelled")

    def before_start(self) -> None:
        """Stop before the call starts if it was aborted or all of it cancelled."""
        self._check()

    def on_step(
        self, step: int, total: int, preview: Callable[[str], bytes | None]
    ) -> None:
        """Check cancels, publish progress, then let waiting premium work run.

        `preview(key)` renders an item's latent preview; it is only called for
        the progress events that carry one.
        """
        self._check()
        self.steps_done += 1
        now = time.monotonic()
        if self._step_mark is not None:
            self.step_seconds += now - self._step_mark
            self.timed_steps += 1
        due = now - self._last_emit >= self._min_interval_s
        with_preview = (
            self._preview_every > 0
            and step - self._last_preview_step >= self._preview_every
        )
        emitted = False
        for key in self.active:
            item = self._progress[key]
            position = item.position(step, total)
            last = position >= item.total
            if position <= item.reported or not (due or last):
                continue
            item.reported = position
            emitted = True
            image = preview(key) if due and with_preview else None
            self._publisher.emit(
                key,
                ProgressEvent(
                    step=position, total=item.total, preview=preview_url(image)
                ),
            )
        if emitted:
            self._last_emit = now
            if due and with_preview:
                self._last_preview_step = step
        if self._on_step_done is not None:
            self._on_step_done(step)
        self._step_mark = now + self._yield()

    def between_images(self) -> None:
        """Let waiting premium work run between the images the VAE decodes: a
        batch's decode takes several steps' time."""
        self._yield()

    def _yield(self) -> float:
        if self._executor is None:
            return 0.0
        yielded = self._executor.run_pending_premium()
        self.yielded_s += yielded
        return yielded

    @property
    def step_s(self) -> float | None:
        """Measured seconds per step of this call; None before two steps."""
        return self.step_seconds / self.timed_steps if self.timed_steps else None

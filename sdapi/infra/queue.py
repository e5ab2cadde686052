"""The one module that uses arq: pools, enqueue, workers, leases, wake-ups.

arq is in maintenance mode upstream, and sdapi needs things it does not do
(per-job time limits, claims a node can tell apart, slots repaired after a
Redis error). Every such workaround lives here, next to the arq internals it
relies on; tests/test_queue.py pins that behaviour and
tests/test_private_apis.py the names, so an arq upgrade that breaks one
fails a test by name. No other module imports arq, which is why the module
is long: its parts share arq's internals. The fair order of premium queues
(its tags and scripts, plain Redis) is sdapi/infra/fair_order.py.

"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import msgpack
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import (
    DeserializationError,
    Job,
    deserialize_job,
    deserialize_job_raw,
    serialize_job,
)
from arq.typing import StartupShutdown
from arq.utils import timestamp_ms
from arq.worker import Retry, Worker, func
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sdapi.contract.events import Event
from sdapi.contract.names import (
    BATCH_FUNCTION,
    CANCEL_CHANNEL,
    CANCEL_TTL_S,
    EVENT_TTL_S,
    GENERATE_FUNCTION,
    batch_job_id,
    batch_queue,
    cancel_key,
    events_key,
    generation_job_id,
    premium_queue,
    wake_channel,
)
from sdapi.contract.payloads import BatchJob, GenerationJob
from sdapi.infra.backoff import backoff_s
from sdapi.infra.fair_order import (
    FairCall,
    advance_clock,
    defer_in_place,
    drop_fair,
    enqueue_tagged,
    queue_enqueue_tagged,
)
from sdapi.infra.redis_writes import keeping_cancellation
from sdapi.infra.streams import add_events

__all__ = ["QueuePool", "QueueWorker", "Retry"]

log = logging.getLogger(__name__)

# A Redis client with `enqueue_job`; what producers and workers hold.
QueuePool = ArqRedis
QueueWorker = Worker
# Before each claim: how long a job must have waited to be taken (seconds),
# or None to take nothing now.
ClaimGate = Callable[[], Awaitable[float | None]]


class _GatedWorker(Worker):
    """A worker that asks `claim_gate` before it claims jobs.

    Workers sharing `claim_lock` claim one at a time, so a gate that looks at
    the others (a node taking one job per tier across its models) sees each
    claim before it decides. The rest of arq 0.28's poll iteration is as is.
    """

    claim_gate: ClaimGate
    claim_lock: asyncio.Lock
    # Whether the queue is fair-scored (`enqueue_fair`): see the module's docs.
    fair: bool = False

    async def _poll_iteration(self) -> None:
        async with self.claim_lock:
            if self.allow_pick_jobs and self.job_counter < self.max_jobs:
                min_age = await self.claim_gate()
                if min_age is not None:
                    now = timestamp_ms()
                    min_age_ms = int(min_age * 1000)
                    job_ids = await self.pool.zrangebyscore(
                        self.queue_name,
                        min=float("-inf"),
                        start=self._queue_read_offset,
                        num=self.queue_read_limit,
                        max=now if self.fair else now - min_age_ms,
                    )
                    if self.fair and min_age_ms > 0:
                        job_ids = await _enqueued_before(
                            self.pool, job_ids, now - min_age_ms
                        )
                    await self.start_jobs(job_ids)
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()
        await self.heart_beat()

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        if self.fair and not finish and incr_score:
            # A retry: arq would move the job to now + defer, behind every fair
            # score. Keep its place; its claim key, held for the defer, keeps
            # every worker off it until then (arq skips a claimed job).
            await defer_in_place(
                self.pool,
                self.queue_name,
                in_progress_key_prefix + job_id,
                job_id,
                incr_score,
                timestamp_ms(),
            )
            return
        await super().finish_job(
            job_id,
            finish,
            result_data,
            result_timeout_s,
            keep_result_forever,
            incr_score,
            keep_in_progress,
        )


# How many waiting jobs a cold-path claim reads at a time.
_COLD_SCAN = 10


async def _enqueued_before(
    pool: QueuePool, job_ids: list[bytes], cutoff_ms: int
) -> list[bytes]:
    """Of `job_ids` (in queue order), those no worker holds that were enqueued
    by `cutoff_ms`: a cold node's claim on a fair queue, whose scores are not
    times. Reads `_COLD_SCAN` jobs per round trip and stops at the first
    round trip that finds one; only a node whose gate asks for a wait (one
    without the model loaded) pays for it."""
    for start in range(0, len(job_ids), _COLD_SCAN):
        chunk = job_ids[start : start + _COLD_SCAN]
        async with pool.pipeline(transaction=False) as pipe:
            for job_id in chunk:
                pipe.exists(in_progress_key_prefix + job_id.decode())
                pipe.get(job_key_prefix + job_id.decode())
            found: list[Any] = await pipe.execute()
        ready = []
        for job_id, held, raw in zip(chunk, found[::2], found[1::2], strict=True):
            if held or raw is None:
                continue
            try:
                enqueued_ms = deserialize_job_raw(raw, deserializer=deserialize)[4]
            except DeserializationError:
                enqueued_ms = 0  # claimed, arq fails it with its reason
            if enqueued_ms <= cutoff_ms:
                ready.append(job_id)
        if ready:
            return ready
    return []


def _fallback(obj: object) -> object:
    # arq stores a failed job's exception as its result; keep its text only.
    if isinstance(obj, BaseException):
        return f"{type(obj).__name__}: {obj}"
    if isinstance(obj, UUID):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def serialize(obj: Any) -> bytes:
    """arq job serializer: msgpack, so nothing in Redis can run code on a worker."""
    data: bytes = msgpack.packb(obj, use_bin_type=True, default=_fallback)
    return data


def deserialize(data: bytes) -> Any:
    """arq job deserializer matching `serialize`."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def redis_settings(url: str) -> RedisSettings:
    """arq connection settings for a redis:// URL that ride out a Redis restart."""
    settings = RedisSettings.from_dsn(url)
    settings.conn_retries = 30
    settings.conn_retry_delay = 1
    settings.retry_on_timeout = True
    # Each command retries with backoff for about 10 s before it fails, so a
    # restart of Redis looks like a slow command, not an error.
    settings.retry = RedisRetry(ExponentialBackoff(cap=2.0, base=0.1), retries=8)
    settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
    return settings


async def create_queue_pool(
    url: str, *, max_connections: int | None = None, deadline_s: float | None = None
) -> QueuePool:
    """An arq pool (a redis.asyncio client with `enqueue_job`) using msgpack.

    With `max_connections`, a command that finds them all busy fails at once
    instead of opening another connection. With `deadline_s` (a request path),
    a command fails with TimeoutError after that long instead of riding out
    a Redis restart: a stalled Redis is a quick 503, never a hung request.
    """
    settings = redis_settings(url)
    settings.max_connections = max_connections
    if deadline_s is not None:
        # One immediate retry after a dropped connection (a restart), no more.
        settings.retry = RedisRetry(NoBackoff(), retries=1)
        settings.retry_on_timeout = False
        settings.conn_timeout = max(1, math.ceil(deadline_s))
    pool: QueuePool = await create_pool(
        settings, job_serializer=serialize, job_deserializer=deserialize
    )
    if deadline_s is not None:
        # arq passes no read timeout; connections made from now on get one,
        # and writes bounded without losing a cancellation. The connection
        # arq opened to ping is dropped, not reused without them.
        connections = pool.connection_pool
        connections.connection_kwargs["socket_timeout"] = deadline_s
        connections.connection_class = keeping_cancellation(
            connections.connection_class
        )
        await connections.disconnect()
        connections.reset()  # type: ignore[no-untyped-call]
    return pool


async def _wake(pool: QueuePool, queue: str) -> None:
    # Best effort: a node that misses it still finds the job at its next poll.
    with contextlib.suppress(RedisError, OSError):
        await pool.publish(wake_channel(queue), b"")


async def enqueue(
    pool: QueuePool,
    function: str,
    payload: BaseModel,
    *,
    queue: str,
    job_id: str,
    defer_s: float | None = None,
) -> bool:
    """Enqueue `function(payload)` and wake `queue`'s workers.

    False when a job with `job_id` already exists. arq 0.28 has no per-job
    timeout: consumers derive theirs from the payload (the GPU node applies
    `sdapi.contract.job_timeout_s`).
    """
    job = await pool.enqueue_job(
        function,
        payload.model_dump(mode="json"),
        _job_id=job_id,
        _queue_name=queue,
        _defer_by=defer_s,
    )
    if job is None:
        return False
    if defer_s is None:
        await _wake(pool, queue)
    return True


# --- fair order (sdapi/infra/fair_order.py) --------------------------------

# How long an enqueued job's data lives unless it starts (arq's default).
_JOB_EXPIRES_MS = 86_400_000


async def enqueue_fair(
    pool: QueuePool,
    function: str,
    payload: BaseModel,
    *,
    queue: str,
    job_id: str,
    owner: str,
    previous_job_id: str | None = None,
    events: Sequence[tuple[UUID | str, Event]] = (),
) -> float | None:
    """Enqueue `function(payload)` at its owner's fair place on `queue`, and
    wake its workers; the job's score, or None when `job_id` exists already.

    `previous_job_id` names an earlier attempt of the same work: the job
    takes its score (its place) if Redis still holds it. `events` go to
    their streams first, so no worker can append after the job's own events
    ahead of them. All of it is one pipelined round trip.
    """
    data = serialize_job(
        function,
        (payload.model_dump(mode="json"),),
        {},
        None,
        timestamp_ms(),
        serializer=serialize,
    )
    call = FairCall(
        queue=queue,
        job_id=job_id,
        job_key=job_key_prefix + job_id,
        result_key=result_key_prefix + job_id,
        data=data,
        expires_ms=_JOB_EXPIRES_MS,
        owner=owner,
        previous_job_id=previous_job_id,
    )
    async with pool.pipeline(transaction=False) as pipe:
        add_events(pipe, events)
        for key in dict.fromkeys(events_key(gid) for gid, _ in events):
            pipe.expire(key, EVENT_TTL_S)
        queue_enqueue_tagged(pipe, call)
        # A hint only (see _wake): sent even for a duplicate, which no
        # worker then finds.
        pipe.publish(wake_channel(queue), b"")
        replies = await pipe.execute(raise_on_error=False)
    *appended, reply, _woken = replies
    for result in (*appended, reply):
        if isinstance(result, Exception) and not isinstance(result, NoScriptError):
            raise result
    if isinstance(reply, NoScriptError):
        # Redis has not seen the script since it started: load it and run
        # it; the events are in their streams already.
        score = await enqueue_tagged(pool, call)
        if score is not None:
            await _wake(pool, queue)
        return score
    return None if reply is None else float(reply)


def _clock_on_start(queue: str) -> StartupShutdown:
    # arq's `on_job_start` hook: ctx carries the score the job was claimed at.
    async def on_job_start(ctx: dict[str, Any]) -> None:
        score = ctx.get("score")
        if isinstance(score, int | float):
            await advance_clock(ctx["redis"], queue, score)

    return on_job_start


async def enqueue_generation(
    pool: QueuePool,
    job: GenerationJob,
    *,
    owner: str,
    events: Sequence[tuple[UUID | str, Event]] = (),
) -> bool:
    """Put one premium generation on its model's premium queue, in fair order
    among `owner`'s (the user's) and everyone else's; a later attempt takes
    the place of the one before. False when the job exists already. `events`
    (its `queued`) go to their streams before, in the same round trip."""
    previous = (
        generation_job_id(job.generation_id, job.attempt - 1)
        if job.attempt > 1
        else None
    )
    score = await enqueue_fair(
        pool,
        GENERATE_FUNCTION,
        job,
        queue=premium_queue(job.model),
        job_id=generation_job_id(job.generation_id, job.attempt),
        owner=owner,
        previous_job_id=previous,
        events=events,
    )
    return score is not None


async def enqueue_batch(pool: QueuePool, batch: BatchJob) -> bool:
    """Put a normal-tier batch on its model's batch queue."""
    return await enqueue(
        pool,
        BATCH_FUNCTION,
        batch,
        queue=batch_queue(batch.model),
        job_id=batch_job_id(batch.batch_id, batch.attempt),
    )


async def request_cancel(pool: Redis, generation_id: UUID | str) -> None:
    """Raise a generation's cancel flag and tell the nodes at once."""
    await pool.set(cancel_key(generation_id), b"1", ex=CANCEL_TTL_S)
    with contextlib.suppress(RedisError, OSError):
        await pool.publish(CANCEL_CHANNEL, str(generation_id).encode())


async def queue_position(pool: QueuePool, queue: str, job_id: str) -> int | None:
    """0-based place of a job in its queue, or None once it left the queue.

    The jobs ranked before it, running ones included (arq keeps them in the
    set): on a premium queue, the fair order it is served in."""
    rank: int | None = await pool.zrank(queue, job_id)
    return rank


async def queue_depth(pool: QueuePool, queue: str) -> int:
    """Jobs waiting or running on `queue` (arq keeps running jobs in the set)."""
    depth: int = await pool.zcard(queue)
    return depth


async def jobs_due(pool: QueuePool, queues: list[str], *, scan: int = 10) -> bool:
    """Whether one of `queues` has a job due now that no worker runs yet (the
    first `scan` due jobs of each are looked at: running ones stay queued)."""
    async with pool.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.zrangebyscore(queue, "-inf", timestamp_ms(), start=0, num=scan)
        due: list[list[bytes]] = await pipe.execute()
    ids = [job_id.decode() for found in due for job_id in found]
    if not ids:
        return False
    async with pool.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.exists(in_progress_key_prefix + job_id)
        running: list[int] = await pipe.execute()
    return not all(running)


async def job_is_live(pool: QueuePool, job_id: str) -> bool:
    """Whether the job is still queued or running (a kept result does not count)."""
    count: int = await pool.exists(
        job_key_prefix + job_id, in_progress_key_prefix + job_id
    )
    return count > 0


async def job_is_running(pool: QueuePool, job_id: str) -> bool:
    """Whether a worker has taken the job and runs it now."""
    count: int = await pool.exists(in_progress_key_prefix + job_id)
    return count > 0


async def drop_waiting_job(pool: QueuePool, queue: str, job_id: str) -> None:
    """Take a job nobody runs off its queue (a worker that takes it meanwhile
    finds it gone and drops it); a fair job's owner gets its round back."""
    if await drop_fair(pool, queue, job_key_prefix + job_id, job_id):
        return
    async with pool.pipeline(transaction=True) as pipe:
        pipe.zrem(queue, job_id)
        pipe.delete(job_key_prefix + job_id)
        await pipe.execute()


async def kept_job_args(pool: QueuePool, job_id: str, queue: str) -> list[Any] | None:
    """The arguments of a finished job whose result arq still keeps, or None."""
    info = await Job(
        job_id, pool, _queue_name=queue, _deserializer=deserialize
    ).result_info()
    if info is None:
        return None
    return list(info.args)


async def job_or_result_exists(pool: QueuePool, job_id: str) -> bool:
    """Whether the job is queued, running, or has ended with a kept result."""
    count: int = await pool.exists(job_key_prefix + job_id, result_key_prefix + job_id)
    return count > 0


# --- running a job ---------------------------------------------------------


@dataclass(frozen=True)
class JobInfo:
    """What a task may know about the run it is in."""

    job_id: str
    job_try: int
    enqueued_at: datetime | None


def job_info(ctx: dict[str, Any]) -> JobInfo:
    """The job a task function runs in, from the context arq passes it."""
    enqueued = ctx.get("enqueue_time")
    return JobInfo(
        job_id=str(ctx.get("job_id", "")),
        job_try=int(ctx.get("job_try", 1)),
        enqueued_at=enqueued if isinstance(enqueued, datetime) else None,
    )


def retry_after(ctx: dict[str, Any], *, cap_s: float = 60) -> Retry:
    """Run the job again later: 2 s after the first try, doubling up to `cap_s`."""
    return Retry(defer=backoff_s(job_info(ctx).job_try, base=2.0, cap=cap_s))


# The value a claim's in-progress key holds while a node has made it its own.
# arq itself writes b"1" for every claim, so a claim that expired and was
# taken by another worker looks the same as one's own; `Lease` replaces it.
_RENEW_LEASE = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not held then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"""

# At the start of a job: arq's fresh claim (b"1") becomes ours.
_TAKE_LEASE = """
local held = redis.call('GET', KEYS[1])
if held and held ~= '1' and held ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class Lease:
    """A worker's hold on the job it runs: arq's claim, marked as its own.

    arq claims a job for (function timeout + 10 s), far too long for a GPU
    job whose node may be SIGKILLed; workers built with `claim_s` claim for
    that long instead, and the running job keeps renewing its lease. The
    claim key then holds `holder`, so a renewal can tell its own expired
    claim (taken back) from one another worker took over (lost).
    """

    def __init__(self, pool: QueuePool, job_id: str, holder: str, ms: int) -> None:
        self._pool = pool
        self._key = in_progress_key_prefix + job_id
        self._holder = holder.encode()
        self._ms = ms

    async def renew(self) -> bool:
        """Extend the lease (or take it back once expired); False if lost."""
        script = self._pool.register_script(_RENEW_LEASE)
        held = await script(keys=[self._key], args=[self._holder, self._ms])
        if held == 2:
            log.warning("the claim on %s had expired; took it back", self._key)
        return bool(held)

    async def take(self) -> bool:
        """Mark the claim arq just made as ours; False if another holds it."""
        script = self._pool.register_script(_TAKE_LEASE)
        return bool(await script(keys=[self._key], args=[self._holder, self._ms]))


# --- workers ---------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A coroutine a worker runs by name: `coroutine(ctx, payload)`."""

    name: str
    coroutine: Callable[..., Awaitable[Any]]
    max_tries: int
    timeout_s: float | None = None


def new_worker(
    tasks: list[Task],
    *,
    queue: str,
    claim_s: float | None = None,
    redis_pool: QueuePool | None = None,
    redis_settings: RedisSettings | None = None,
    ctx: dict[str, Any] | None = None,
    on_startup: StartupShutdown | None = None,
    on_shutdown: StartupShutdown | None = None,
    after_job_end: StartupShutdown | None = None,
    max_jobs: int = 10,
    max_tries: int = 5,
    job_timeout: float = 300,
    keep_result: float = 3600,
    poll_delay: float = 0.5,
    health_check_interval: float = 3600,
    health_check_key: str | None = None,
    handle_signals: bool = True,
    job_completion_wait: int = 0,
    burst: bool = False,
    log_results: bool = True,
    claim_gate: ClaimGate | None = None,
    claim_lock: asyncio.Lock | None = None,
    fair: bool = False,
) -> QueueWorker:
    """An arq worker for `tasks` on `queue`, speaking msgpack.

    The defaults are arq 0.28's own; times are in seconds.

    :param tasks: the coroutines the worker runs, each with its tries and timeout
    :param queue: the queue (a Redis sorted set) the worker takes jobs from
    :param claim_s: how long a claim lasts unless its job renews it (`Lease`);
      without it, arq's own: the longest task timeout plus 10 s
    :param redis_pool: a pool to use (from `create_queue_pool`), or None for
      one the worker opens from `redis_settings` (and closes)
    :param redis_settings: where to connect when no `redis_pool` is given
      (`redis_settings()`); None for arq's default, localhost:6379
    :param ctx: the dictionary every task and hook receives as `ctx`
    :param on_startup: awaited with `ctx` before the first job
    :param on_shutdown: awaited with `ctx` once the worker stops
    :param after_job_end: awaited with `ctx` after each job ended and its
      result was recorded (`wake_after_job`)
    :param max_jobs: jobs run at the same time
    :param max_tries: tries of a task that gives no `max_tries` itself
    :param job_timeout: run time of a task that gives no `timeout_s` itself
    :param keep_result: how long a finished job's result stays in Redis
    :param poll_delay: pause between two polls of the queue
    :param health_check_interval: how often the worker writes its health key
    :param health_check_key: that key; None for `<queue>:health-check`
    :param handle_signals: whether the worker stops itself on SIGINT/SIGTERM
      (False when the process handles them)
    :param job_completion_wait: after such a signal, how long running jobs may
      finish (taking no new ones) before they are cancelled
    :param burst: stop once the queue is empty (tests)
    :param log_results: log each successful job's result
    :param claim_gate: asked before each claim (`ClaimGate`); None claims any
      job that is due
    :param claim_lock: shared by workers whose gates depend on each other
    :param fair: the queue is fair-scored (`enqueue_fair`): starting a job
      moves its virtual time, a retry keeps the job's place, and a gate's wait
      is measured from each job's enqueue time (a gated worker only)
    """
    if fair and claim_gate is None:
        claim_gate = _claim_any
    worker = (Worker if claim_gate is None else _GatedWorker)(
        functions=[
            func(
                cast(Any, task.coroutine),
                name=task.name,
                max_tries=task.max_tries,
                timeout=task.timeout_s,
            )
            for task in tasks
        ],
        queue_name=queue,
        redis_pool=redis_pool,
        redis_settings=redis_settings,
        ctx=ctx,
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        after_job_end=after_job_end,
        on_job_start=_clock_on_start(queue) if fair else None,
        max_jobs=max_jobs,
        max_tries=max_tries,
        job_timeout=job_timeout,
        keep_result=keep_result,
        poll_delay=poll_delay,
        health_check_interval=health_check_interval,
        health_check_key=health_check_key,
        handle_signals=handle_signals,
        job_completion_wait=job_completion_wait,
        burst=burst,
        log_results=log_results,
        job_serializer=serialize,
        job_deserializer=deserialize,
    )
    if claim_s is not None:
        worker.in_progress_timeout_s = claim_s
    if isinstance(worker, _GatedWorker) and claim_gate is not None:
        worker.claim_gate = claim_gate
        worker.claim_lock = claim_lock or asyncio.Lock()
        worker.fair = fair
    return worker


async def _claim_any() -> float:
    return 0.0


def running_jobs(worker: QueueWorker) -> list[asyncio.Task[Any]]:
    """The worker's jobs that have not ended yet."""
    return [task for task in worker.tasks.values() if not task.done()]


def is_running(worker: QueueWorker) -> bool:
    """Whether the worker holds a job slot now (a job claimed and not ended)."""
    return worker.job_counter > 0


def stop_taking_jobs(worker: QueueWorker) -> None:
    """Let running jobs finish; claim no new ones."""
    worker.allow_pick_jobs = False


async def run_worker(worker: QueueWorker) -> None:
    """Run `worker`'s poll loop, restarting it after Redis errors.

    arq's loop dies on a Redis error; a Redis restart must not end the
    process. Any other exception is a bug and propagates.
    """
    while True:
        try:
            await worker.main()
            return
        except (RedisError, OSError) as exc:
            log.warning(
                "queue %s: Redis unavailable (%s); retrying", worker.queue_name, exc
            )
            await _release_lost_slots(worker)
            await asyncio.sleep(1.0)


async def _release_lost_slots(worker: QueueWorker) -> None:
    # arq 0.28 takes a job slot before claiming a job in Redis and gives it back
    # only when the job's task ends; a Redis error in between leaks the slot,
    # and with max_jobs=1 the worker would never take a job again.
    running = len(running_jobs(worker))
    if worker.job_counter == running:
        return
    worker.job_counter = running
    worker.sem = asyncio.BoundedSemaphore(worker.max_jobs + 1)
    for _ in range(running):
        await worker.sem.acquire()


async def poll_when_woken(worker: QueueWorker, woken: asyncio.Event) -> None:
    """Run an extra poll of `worker`'s queue each time `woken` is set.

    A producer published new work: claim it now rather than at the worker's
    next poll. arq 0.28's poll iteration claims a job atomically (WATCH/MULTI
    on its in-progress key), so one beside the worker's own loop cannot start
    a job twice.
    """
    while True:
        await woken.wait()
        woken.clear()
        # Woken as a job ends (`wake_after_job`), arq frees its slot in a
        # callback that runs right after: give it a turn or two of the loop.
        for _ in range(3):
            if worker.job_counter < worker.max_jobs:
                break
            await asyncio.sleep(0)
        if not worker.allow_pick_jobs or worker.job_counter >= worker.max_jobs:
            continue
        try:
            await worker._poll_iteration()
        except (RedisError, OSError) as exc:
            log.debug("wake-up poll of %s failed: %s", worker.queue_name, exc)


def wake_after_job(woken: asyncio.Event) -> StartupShutdown:
    """An arq `after_job_end` hook: look for the next job as soon as one ends.

    A worker that takes one job at a time ignores wake-ups while busy; without
    this, work that arrived meanwhile would wait for the next poll.
    """

    async def after_job_end(ctx: dict[str, Any]) -> None:
        woken.set()

    return after_job_end


# --- reading a queue's order (estimated times) ------------------------------


@dataclass(frozen=True)
class QueuedJob:
    """A job in a queue, as estimates need it."""

    job_id: str
    # Its first argument (the payload's JSON form); None once it is gone.
    payload: Any
    # Claimed by a worker (arq keeps running jobs in the queue).
    running: bool


@dataclass
class QueueOrder:
    """The jobs ranked before one job of a queue, read in two pipelined round
    trips that the caller shares with its own commands: `ask_rank` then
    `take_rank`, `ask_jobs` then `take_jobs`. The order is the rank order, the
    one the workers serve (never the scores). For a job about to be enqueued
    (`job_id` None), the first `place` jobs are ahead of it (all of them when
    None)."""

    queue: str
    job_id: str | None
    place: int | None = None
    # Read at most this many jobs ahead; `unread` counts the others.
    scan: int = 50
    rank: int | None = None
    ids: list[str] | None = None

    def ask_rank(self, pipe: Pipeline) -> int:
        """Queue the rank reads on `pipe`; how many results they take."""
        if self.job_id is None:
            pipe.zcard(self.queue)
        else:
            pipe.zrank(self.queue, self.job_id)
        pipe.zrange(self.queue, 0, self.scan - 1)
        return 2

    def take_rank(self, results: list[Any]) -> None:
        """Read `ask_rank`'s results: None rank when the job left the queue."""
        rank, ids = results
        self.rank = None if rank is None else int(rank)
        if self.job_id is None and self.place is not None and self.rank is not None:
            self.rank = min(self.place, self.rank)
        listed = [raw.decode() if isinstance(raw, bytes) else str(raw) for raw in ids]
        if self.rank is None:
            listed = []
        elif self.job_id is not None and self.job_id in listed:
            listed = listed[: listed.index(self.job_id)]
        else:
            listed = listed[: self.rank]
        self.ids = listed

    @property
    def unread(self) -> int:
        """Jobs ahead that were not read (past `scan`)."""
        if self.rank is None or self.ids is None:
            return 0
        return max(0, self.rank - len(self.ids))

    def ask_jobs(self, pipe: Pipeline, also: Sequence[str] = ()) -> int:
        """Queue the reads of the jobs ahead (and `also`); how many results."""
        ids = [*(self.ids or []), *also]
        for job_id in ids:
            pipe.get(job_key_prefix + job_id)
            pipe.exists(in_progress_key_prefix + job_id)
        return 2 * len(ids)

    def take_jobs(
        self, results: list[Any], also: Sequence[str] = ()
    ) -> list[QueuedJob]:
        """The jobs of `ask_jobs`, the ones ahead first, then `also`."""
        ids = [*(self.ids or []), *also]
        found = []
        for index, job_id in enumerate(ids):
            raw, running = results[2 * index], results[2 * index + 1]
            payload = None
            if raw is not None:
                with contextlib.suppress(DeserializationError):
                    args = deserialize_job(raw, deserializer=deserialize).args
                    payload = args[0] if args else None
            found.append(QueuedJob(job_id, payload, bool(running)))
        return found

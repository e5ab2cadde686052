"""The queue adapter (`sdapi.infra.queue`) and the arq behaviour it relies on.

Each workaround in the adapter leans on something arq 0.28 does; these tests
pin it, so an arq upgrade that changes it fails here, by name, rather than as
a lost job somewhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator
from typing import Any, get_type_hints

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix

from sdapi.contract.events import QueuedEvent
from sdapi.contract.names import events_key, premium_queue, wake_channel
from sdapi.contract.payloads import GenerationJob, GenerationParams
from sdapi.contract.status import Tier
from sdapi.infra.queue import (
    Lease,
    QueuedJob,
    QueueOrder,
    QueuePool,
    QueueWorker,
    Retry,
    Task,
    create_queue_pool,
    deserialize,
    enqueue,
    enqueue_generation,
    job_info,
    job_is_live,
    job_is_running,
    job_or_result_exists,
    kept_job_args,
    new_worker,
    poll_when_woken,
    retry_after,
    run_worker,
    running_jobs,
    serialize,
)
from sdapi.infra.streams import read_events
from tests.support import until

QUEUE = "sdapi:test:adapter"


class Payload:
    """Not a pydantic model: `enqueue` takes anything with `model_dump`."""

    def __init__(self, value: int) -> None:
        self.value = value

    def model_dump(self, mode: str = "json") -> dict[str, Any]:
        return {"value": self.value}


@pytest.fixture
async def pool(clean_redis: str) -> AsyncIterator[QueuePool]:
    client = await create_queue_pool(clean_redis)
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def serving(worker: QueueWorker) -> AsyncIterator[None]:
    task = asyncio.create_task(run_worker(worker))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.gather(*running_jobs(worker), return_exceptions=True)


def test_jobs_travel_as_msgpack_not_pickle() -> None:
    data = serialize({"a": [1, "two"]})
    assert not data.startswith(b"\x80")  # pickle's protocol marker
    assert deserialize(data) == {"a": [1, "two"]}
    with pytest.raises(TypeError):
        serialize({"a": object()})


async def test_a_claim_lasts_claim_s_and_holds_arqs_mark(pool: QueuePool) -> None:
    """`new_worker(claim_s=...)` shortens arq's claim; arq marks it b"1"
    (what `Lease.take` expects to find)."""
    release = asyncio.Event()

    async def hold(ctx: dict[str, Any], payload: Any) -> str:
        await release.wait()
        return "held"

    worker = new_worker(
        [Task("hold", hold, max_tries=1, timeout_s=3600)],
        queue=QUEUE,
        claim_s=3,
        redis_pool=pool,
        handle_signals=False,
        poll_delay=0.05,
        max_jobs=1,
    )
    await enqueue(pool, "hold", Payload(1), queue=QUEUE, job_id="claimed")
    async with serving(worker):
        key = in_progress_key_prefix + "claimed"
        await until(lambda: pool.exists(key), 10)
        assert await pool.get(key) == b"1"
        assert 0 < await pool.pttl(key) <= 3000
        assert await job_is_running(pool, "claimed")
        release.set()
        await until(lambda: job_or_result_exists(pool, "claimed"), 10)


async def test_a_lease_tells_its_own_expired_claim_from_a_takeover(
    pool: QueuePool,
) -> None:
    key = in_progress_key_prefix + "leased"
    await pool.set(key, b"1", px=5000)  # arq's fresh claim
    mine = Lease(pool, "leased", "node-a:1", 5000)
    assert await mine.take()
    assert await pool.get(key) == b"node-a:1"
    assert await mine.renew()

    await pool.delete(key)  # our claim expired; nobody took the job
    assert await mine.renew()
    assert await pool.get(key) == b"node-a:1"

    await pool.set(key, b"1", px=5000)  # another worker's claim now
    assert not await mine.renew()
    other = Lease(pool, "leased", "node-b:7", 5000)
    assert await other.take()
    assert not await mine.take()
    assert await pool.get(key) == b"node-b:7"


async def test_a_woken_worker_takes_work_before_its_next_poll(
    pool: QueuePool,
) -> None:
    done = asyncio.Event()

    async def note(ctx: dict[str, Any], payload: Any) -> str:
        done.set()
        return "noted"

    worker = new_worker(
        [Task("note", note, max_tries=1)],
        queue=QUEUE,
        redis_pool=pool,
        handle_signals=False,
        # Far longer than the test waits: only the wake-up can start the job.
        poll_delay=3600,
        max_jobs=1,
    )
    woken = asyncio.Event()
    async with serving(worker):
        # The worker's first poll (it ends by recording its health) found
        # nothing; the next one is an hour away.
        await until(lambda: pool.exists(worker.health_check_key), 10)
        waker = asyncio.create_task(poll_when_woken(worker, woken))
        try:
            await enqueue(pool, "note", Payload(2), queue=QUEUE, job_id="woken")
            woken.set()
            await asyncio.wait_for(done.wait(), timeout=10)
        finally:
            waker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waker


async def test_only_retry_runs_a_job_again_and_a_kept_result_holds_its_args(
    pool: QueuePool,
) -> None:
    tries: list[int] = []

    async def flaky(ctx: dict[str, Any], payload: Any) -> str:
        info = job_info(ctx)
        tries.append(info.job_try)
        assert info.job_id == "flaky" and info.enqueued_at is not None
        if info.job_try == 1:
            raise retry_after(ctx, cap_s=0)
        return f"value {payload['value']}"

    worker = new_worker(
        [Task("flaky", flaky, max_tries=3)],
        queue=QUEUE,
        redis_pool=pool,
        handle_signals=False,
        poll_delay=0.05,
        burst=True,
    )
    await enqueue(pool, "flaky", Payload(7), queue=QUEUE, job_id="flaky")
    assert await job_is_live(pool, "flaky")
    await worker.async_run()
    assert tries == [1, 2]
    assert not await job_is_live(pool, "flaky")
    assert await kept_job_args(pool, "flaky", QUEUE) == [{"value": 7}]
    # The id is taken while the result is kept: a second enqueue is refused.
    assert not await enqueue(pool, "flaky", Payload(8), queue=QUEUE, job_id="flaky")


def test_retry_backs_off_exponentially_up_to_its_cap() -> None:
    assert retry_after({"job_try": 1}).defer_score == 2000
    assert retry_after({"job_try": 10}).defer_score == 60_000
    assert isinstance(retry_after({}), Retry)


def test_new_worker_takes_typed_options() -> None:
    """Every option is a typed keyword of its own: a misspelt one fails at the
    call (and in mypy), not as a TypeError deep inside arq."""
    signature = inspect.signature(new_worker)
    kinds = {parameter.kind for parameter in signature.parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    hints = get_type_hints(new_worker)
    assert set(signature.parameters) <= set(hints)
    # What the jobs worker and the GPU node pass.
    for name in (
        "redis_pool",
        "redis_settings",
        "ctx",
        "on_startup",
        "on_shutdown",
        "after_job_end",
        "max_jobs",
        "max_tries",
        "job_timeout",
        "keep_result",
        "poll_delay",
        "health_check_interval",
        "health_check_key",
        "handle_signals",
        "job_completion_wait",
        "log_results",
    ):
        assert name in signature.parameters, name
        assert f":param {name}:" in (new_worker.__doc__ or ""), name


def test_new_worker_passes_each_option_to_arq() -> None:
    async def noop(ctx: dict[str, Any], payload: Any) -> None:
        return None

    async def build() -> QueueWorker:
        return new_worker(
            [Task("noop", noop, max_tries=1)],
            queue=QUEUE,
            claim_s=7,
            ctx={"marker": 1},
            max_jobs=3,
            max_tries=4,
            job_timeout=11,
            keep_result=12,
            poll_delay=0.25,
            health_check_interval=13,
            health_check_key="hc",
            handle_signals=False,
            job_completion_wait=2,
            burst=True,
            log_results=False,
        )

    worker = asyncio.run(build())
    assert worker.queue_name == QUEUE
    assert worker.in_progress_timeout_s == 7
    assert worker.ctx == {"marker": 1}
    assert (worker.max_jobs, worker.max_tries) == (3, 4)
    assert (worker.job_timeout_s, worker.keep_result_s) == (11, 12)
    assert (worker.poll_delay_s, worker.health_check_interval) == (0.25, 13)
    assert worker.health_check_key == "hc"
    assert worker.burst and not worker.log_results


async def order_of(
    pool: QueuePool, job_id: str | None, scan: int = 50
) -> tuple[QueueOrder, list[QueuedJob]]:
    """A QueueOrder read in its two round trips."""
    order = QueueOrder(QUEUE, job_id, scan=scan)
    async with pool.pipeline(transaction=False) as pipe:
        order.ask_rank(pipe)
        order.take_rank(await pipe.execute())
    async with pool.pipeline(transaction=False) as pipe:
        order.ask_jobs(pipe)
        return order, order.take_jobs(await pipe.execute())


async def test_the_jobs_ahead_follow_the_rank_order_with_their_payloads(
    pool: QueuePool,
) -> None:
    for n, job_id in enumerate(("a", "b", "c")):
        await enqueue(pool, "run", Payload(n), queue=QUEUE, job_id=job_id)
    await pool.set(in_progress_key_prefix + "a", b"1", ex=60)
    order, ahead = await order_of(pool, "c")
    assert order.rank == 2
    assert ahead == [
        QueuedJob("a", {"value": 0}, running=True),
        QueuedJob("b", {"value": 1}, running=False),
    ]
    # The rank order is the order, whatever the scores say of time: a queue
    # that orders its jobs otherwise (a fair share) is followed as it is.
    await pool.zadd(QUEUE, {"c": 0})
    order, ahead = await order_of(pool, "b")
    assert (order.rank, [job.job_id for job in ahead]) == (2, ["c", "a"])
    # Past `scan`, the rest are counted, not read.
    order, ahead = await order_of(pool, "b", scan=1)
    assert (len(ahead), order.unread) == (1, 1)
    # About to be enqueued: everything queued is ahead.
    order, ahead = await order_of(pool, None)
    assert (order.rank, len(ahead)) == (3, 3)
    # Gone from the queue: no rank, nothing ahead.
    order, ahead = await order_of(pool, "gone")
    assert (order.rank, ahead) == (None, [])
    # A job whose payload went meanwhile reads as None.
    await pool.delete(job_key_prefix + "a")
    _, ahead = await order_of(pool, "b")
    assert ahead[1] == QueuedJob("a", None, running=True)


async def test_a_generation_goes_in_one_round_trip_with_its_events_first(
    pool: QueuePool,
) -> None:
    """enqueue_generation pipelines the events, the fair enqueue and the
    wake-up; a Redis that lost its scripts (restarted) gets them loaded."""
    job = GenerationJob(
        generation_id=uuid.uuid4(),
        model="tiny",
        tier=Tier.PREMIUM,
        params=GenerationParams(
            prompt="a cat",
            width=64,
            height=64,
            steps=4,
            guidance_scale=7.5,
            seed=1,
            num_images=1,
            scheduler="euler",
        ),
        attempt=1,
    )
    queue = premium_queue("tiny")
    woken: list[bytes] = []
    async with pool.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(wake_channel(queue))
        for flushed in (True, False):
            if flushed:
                await pool.script_flush()
            attempt = job.model_copy(update={"attempt": 1 if flushed else 2})
            queued = QueuedEvent(position=0, waiting_for_node=False)
            assert await enqueue_generation(
                pool, attempt, owner="u", events=[(job.generation_id, queued)]
            )
            message = await until(lambda: pubsub.get_message(timeout=1), what="wake")
            woken.append(message["data"])
        # A duplicate is refused, its events still appended.
        again = job.model_copy(update={"attempt": 2})
        assert not await enqueue_generation(
            pool, again, owner="u", events=[(job.generation_id, queued)]
        )
    assert woken == [b"", b""]
    assert await pool.zcard(queue) == 2
    events = await read_events(pool, job.generation_id)
    assert [type(event) for _, event in events] == [QueuedEvent] * 3
    assert await pool.ttl(events_key(job.generation_id)) > 0

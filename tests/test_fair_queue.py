"""Fair order on a queue (`sdapi.infra.queue`'s tag script and fair workers).

What the GPU node makes of it, with real nodes, is in
tests/gpu_node/test_fairness.py; here the tags themselves: rounds, ties,
stale users, a later attempt's place, cancels, retries and the cold-claim
wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms

from sdapi.contract.names import fair_clock_key, fair_owner_key, fair_tag_key
from sdapi.infra.fair_order import (
    FAIR_BASE,
    MAX_ROUND,
    ROUND_SLOTS,
    advance_clock,
    fair_round,
    places_ahead,
    places_ahead_reply,
    queue_places_ahead,
)
from sdapi.infra.queue import (
    QueuePool,
    QueueWorker,
    Retry,
    Task,
    create_queue_pool,
    drop_waiting_job,
    enqueue_fair,
    job_or_result_exists,
    new_worker,
    queue_position,
    run_worker,
    running_jobs,
    serialize,
)
from tests.support import until

QUEUE = "sdapi:test:fair"


class Payload:
    def __init__(self, value: str) -> None:
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


async def put(
    pool: QueuePool, job_id: str, owner: str, previous: str | None = None
) -> float | None:
    return await enqueue_fair(
        pool,
        "work",
        Payload(job_id),
        queue=QUEUE,
        job_id=job_id,
        owner=owner,
        previous_job_id=previous,
    )


async def order(pool: QueuePool) -> list[str]:
    return [job_id.decode() for job_id in await pool.zrange(QUEUE, 0, -1)]


def score(round_: int, slot: int = 0) -> int:
    return FAIR_BASE + round_ * ROUND_SLOTS + slot


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


async def test_the_place_read_in_a_pipeline_is_places_ahead(pool: QueuePool) -> None:
    """By SHA in the caller's pipeline, loaded again after Redis lost it."""
    for job_id, owner in [("A1", "a"), ("A2", "a"), ("B1", "b")]:
        assert await put(pool, job_id, owner) is not None
    for flushed in (True, False):
        if flushed:
            await pool.script_flush()
        async with pool.pipeline(transaction=False) as pipe:
            queue_places_ahead(pipe, QUEUE, "c")
            [reply] = await pipe.execute(raise_on_error=False)
        assert await places_ahead_reply(pool, reply, QUEUE, "c") == 2
        assert await places_ahead(pool, QUEUE, "a") == 3


async def test_users_take_turns_and_ties_go_by_arrival(pool: QueuePool) -> None:
    arrivals = [("A1", "a"), ("A2", "a"), ("B1", "b"), ("C1", "c"), ("C2", "c")]
    arrivals.append(("A3", "a"))
    for job_id, owner in arrivals:
        ahead = await places_ahead(pool, QUEUE, owner)
        assert await put(pool, job_id, owner) is not None
        # What web reports before the job exists is the rank it gets.
        assert await queue_position(pool, QUEUE, job_id) == ahead, job_id
    assert await order(pool) == ["A1", "B1", "C1", "A2", "C2", "A3"]
    scores = dict(await pool.zrange(QUEUE, 0, -1, withscores=True))
    assert (scores[b"A1"], scores[b"C1"]) == (score(0, 0), score(0, 2))
    assert [fair_round(scores[k]) for k in (b"A2", b"C2", b"A3")] == [1, 1, 2]
    # Every fair score is due: below any time arq compares it with.
    assert all(s < 0 for s in scores.values())
    assert fair_round(timestamp_ms()) is None


async def test_the_same_job_id_is_enqueued_once_and_costs_no_round(
    pool: QueuePool,
) -> None:
    assert await put(pool, "A1", "a") == score(0)
    assert await put(pool, "A1", "a") is None
    assert await pool.get(fair_owner_key(QUEUE, "a")) == b"1"
    assert await put(pool, "A2", "a") == score(1)


async def test_a_user_with_nothing_queued_starts_at_the_clock(
    pool: QueuePool,
) -> None:
    for n in range(3):
        await put(pool, f"A{n}", "a")  # rounds 0, 1, 2
    # Jobs started up to round 5 meanwhile (other users' work).
    assert await advance_clock(pool, QUEUE, score(5, 3))
    assert not await advance_clock(pool, QUEUE, score(4))  # never back
    assert not await advance_clock(pool, QUEUE, timestamp_ms())  # not a tag
    assert await pool.get(fair_clock_key(QUEUE)) == b"5"
    # a's finish tag (3) is stale: a starts at the clock like newcomer b.
    assert fair_round(await put(pool, "B1", "b") or 0) == 5
    assert fair_round(await put(pool, "A3", "a") or 0) == 5
    # A finish tag that expired counts as none.
    await put(pool, "C1", "c")
    await put(pool, "C2", "c")
    await pool.delete(fair_owner_key(QUEUE, "c"))
    assert fair_round(await put(pool, "C3", "c") or 0) == 5
    assert (await order(pool))[-5:] == ["B1", "A3", "C1", "C3", "C2"]


async def test_a_later_attempt_goes_back_to_its_place(pool: QueuePool) -> None:
    first = await put(pool, "g", "a")
    await put(pool, "B1", "b")
    await put(pool, "A2", "a")
    # Redis lost the job (not its tag); the reconciler enqueues attempt 2.
    await pool.zrem(QUEUE, "g")
    await pool.delete(job_key_prefix + "g")
    assert await put(pool, "g:2", "a", previous="g") == first
    assert await order(pool) == ["g:2", "B1", "A2"]
    # Its round was paid for once.
    assert await pool.get(fair_owner_key(QUEUE, "a")) == b"2"
    assert await pool.hget(fair_tag_key("g:2"), "owner") == b"a"
    # Without a kept tag, a later attempt is new work.
    assert fair_round(await put(pool, "h:2", "c", previous="h") or 0) == 0


async def test_a_cancelled_job_gives_its_round_back(pool: QueuePool) -> None:
    await put(pool, "A1", "a")
    await put(pool, "A2", "a")
    await put(pool, "B1", "b")
    await drop_waiting_job(pool, QUEUE, "A2")
    assert await order(pool) == ["A1", "B1"]
    assert not await pool.exists(job_key_prefix + "A2")
    # a's next job takes the dropped job's round, not one behind it.
    assert fair_round(await put(pool, "A3", "a") or 0) == 1


def test_scores_are_exact_at_the_ends_of_the_range() -> None:
    last = float(FAIR_BASE + (MAX_ROUND + 1) * ROUND_SLOTS - 1)
    assert last == -1 and fair_round(last) == MAX_ROUND
    assert fair_round(float(FAIR_BASE)) == 0
    assert float(score(MAX_ROUND, 1)) - float(score(MAX_ROUND, 0)) == 1


async def test_a_retried_job_keeps_its_place_and_waits_out_its_defer(
    pool: QueuePool,
) -> None:
    runs: list[str] = []

    async def work(ctx: dict[str, Any], payload: Any) -> str:
        runs.append(payload["value"])
        if payload["value"] == "A1" and runs.count("A1") == 1:
            raise Retry(defer=30)
        return "done"

    await put(pool, "A1", "a")
    await put(pool, "B1", "b")
    await put(pool, "A2", "a")
    before = await pool.zscore(QUEUE, "A1")
    worker = new_worker(
        [Task("work", work, max_tries=3)],
        queue=QUEUE,
        redis_pool=pool,
        handle_signals=False,
        poll_delay=0.02,
        max_jobs=1,
        fair=True,
    )
    async with serving(worker):
        await until(lambda: _ended(pool, "A2"), 20)
    # A1 ran, asked for a retry in 30 s, and kept its score (first in line),
    # held off by its claim key meanwhile; the others ran in their order.
    assert runs == ["A1", "B1", "A2"]
    assert await pool.zscore(QUEUE, "A1") == before
    assert await order(pool) == ["A1"]
    held = in_progress_key_prefix + "A1"
    assert await pool.get(held) == b"deferred"
    assert 20_000 < await pool.pttl(held) <= 30_000
    # Each start moved the clock to its round: B1's (0), then A2's (1).
    assert await pool.get(fair_clock_key(QUEUE)) == b"1"


async def _ended(pool: QueuePool, job_id: str) -> bool:
    return not await pool.exists(job_key_prefix + job_id) and bool(
        await job_or_result_exists(pool, job_id)
    )


async def test_a_gated_wait_counts_from_each_jobs_enqueue_time(
    pool: QueuePool,
) -> None:
    ran: list[str] = []

    async def work(ctx: dict[str, Any], payload: Any) -> str:
        ran.append(payload["value"])
        return "done"

    async def an_hour() -> float:
        return 3600.0

    await put(pool, "young", "a")
    await put(pool, "old", "b")
    # "old" was enqueued two hours ago (its score, a tag, says nothing of it).
    data = serialize_job(
        "work",
        ({"value": "old"},),
        {},
        None,
        timestamp_ms() - 7_200_000,
        serializer=serialize,
    )
    await pool.set(job_key_prefix + "old", data, px=60_000)
    worker = new_worker(
        [Task("work", work, max_tries=1)],
        queue=QUEUE,
        redis_pool=pool,
        handle_signals=False,
        poll_delay=0.02,
        max_jobs=1,
        claim_gate=an_hour,
        fair=True,
    )
    async with serving(worker):
        await until(lambda: _ended(pool, "old"), 20)
    # "young", first in line, would have gone first but for its enqueue time.
    assert ran == ["old"]
    assert await order(pool) == ["young"]
    assert not await pool.exists(in_progress_key_prefix + "young")


async def test_tags_stay_exact_at_the_last_round(pool: QueuePool) -> None:
    await pool.set(fair_clock_key(QUEUE), MAX_ROUND - 1)
    assert await put(pool, "A1", "a") == score(MAX_ROUND - 1)
    assert await put(pool, "B1", "b") == score(MAX_ROUND - 1, 1)
    assert await put(pool, "A2", "a") == score(MAX_ROUND)
    # Past the last round, work shares it (ordered by arrival still).
    assert await put(pool, "A3", "a") == score(MAX_ROUND, 1)
    assert int(await pool.get(fair_owner_key(QUEUE, "a")) or 0) == MAX_ROUND + 1
    assert await advance_clock(pool, QUEUE, score(MAX_ROUND, 1))
    assert int(await pool.get(fair_clock_key(QUEUE)) or 0) == MAX_ROUND
    assert await pool.zscore(QUEUE, "A3") == score(MAX_ROUND, 1)

"""The reconciler against the real database and Redis, in-process."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from datetime import timedelta
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_result

from jobs import reconciler
from jobs.dispatcher import dispatch_due, generation_job
from jobs.reconciler import GAVE_UP_CODE, UNAVAILABLE_CODE, Report, reconcile
from jobs.resources import JobsResources
from jobs.settings import JobsSettings
from sdapi.contract.events import DoneEvent, QueuedEvent
from sdapi.contract.names import (
    RESULTS_QUEUE,
    STORE_RESULT_FUNCTION,
    batch_job_id,
    batch_queue,
    generation_job_id,
    image_key,
    premium_queue,
    result_job_id,
)
from sdapi.contract.payloads import BatchJob, GenerationResult, ImageInfo
from sdapi.contract.status import Status, Tier
from sdapi.db.connection import open_database
from sdapi.db.models import GeneratedImage, Generation, OutboxEmail, utcnow
from sdapi.devtools.accounts import make_user
from sdapi.infra.queue import (
    deserialize,
    enqueue,
    enqueue_generation,
    job_is_live,
    serialize,
)
from sdapi.infra.streams import read_events
from tests.jobs.conftest import (
    announce_node,
    make_generation,
    make_resources,
)


async def overdue(*rows: Generation) -> None:
    """Move the rows' deadline into the past (time passing, without sleeping)."""
    await Generation.filter(id__in=[row.id for row in rows]).update(
        deadline=utcnow() - timedelta(seconds=1)
    )


async def test_a_lost_premium_job_is_enqueued_again(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    row = await make_generation(user, tier=Tier.PREMIUM)  # its enqueue never happened
    await overdue(row)

    report = await reconcile(res)

    assert report.requeued == 1
    stored = await Generation.get(id=row.id)
    assert stored.status is Status.QUEUED
    assert stored.attempts == 2
    assert stored.deadline is not None and stored.deadline > utcnow()
    job_id = generation_job_id(row.id, 2)
    assert await res.redis.zscore(premium_queue(row.model), job_id) is not None
    events = [event for _, event in await read_events(res.redis, row.id)]
    assert isinstance(events[-1], QueuedEvent)
    # Its job is alive now: the next rounds only move the deadline.
    await overdue(row)
    report = await reconcile(res)
    assert (report.alive, report.requeued) == (1, 0)
    assert (await Generation.get(id=row.id)).attempts == 2


async def test_live_work_is_left_alone(jobs_resources: JobsResources) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    row = await make_generation(user, tier=Tier.PREMIUM, status=Status.RUNNING)
    await enqueue_generation(res.redis, generation_job(row, 1), owner=str(row.user_id))
    await overdue(row)

    report = await reconcile(res)

    assert (report.alive, report.requeued, report.failed) == (1, 0, 0)
    stored = await Generation.get(id=row.id)
    assert stored.status is Status.RUNNING and stored.attempts == 1
    assert stored.deadline is not None and stored.deadline > utcnow()


async def test_a_lost_batch_goes_back_as_a_new_batch(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    await announce_node(res, max_batch=4)
    user = (await make_user(premium=False)).user
    rows = [await make_generation(user, seed=i) for i in range(3)]
    await dispatch_due(res)
    first = await Generation.get(id=rows[0].id)
    old_batch = first.batch_id
    assert old_batch is not None
    # One started, one was cancelled; then Redis lost everything.
    await Generation.filter(id=rows[1].id).update(status=Status.RUNNING)
    await Generation.filter(id=rows[2].id).update(status=Status.CANCELLED)
    await res.redis.flushdb()
    await overdue(*rows)

    report = await reconcile(res)

    assert report.requeued == 2
    again = [await Generation.get(id=row.id) for row in rows[:2]]
    batch_id = again[0].batch_id
    assert batch_id is not None and batch_id != old_batch
    job_id = batch_job_id(batch_id, 2)
    assert await job_is_live(res.redis, job_id)
    assert await res.redis.zrange(batch_queue(first.model), 0, -1) == [job_id.encode()]
    for stored in again:
        assert (stored.status, stored.attempts, stored.batch_id) == (
            Status.QUEUED,
            2,
            batch_id,
        )
        assert stored.started_at is None
    cancelled = await Generation.get(id=rows[2].id)
    assert (cancelled.status, cancelled.attempts) == (Status.CANCELLED, 1)


async def test_rows_of_one_batch_requeued_apart_get_jobs_of_their_own(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    await announce_node(res, max_batch=4)
    user = (await make_user(premium=False)).user
    early, late = [await make_generation(user, seed=i) for i in range(2)]
    await dispatch_due(res)
    await res.redis.flushdb()
    # `late` finished on the node; its store_result is still waiting.
    await enqueue(
        res.redis,
        STORE_RESULT_FUNCTION,
        generation_job(late, 1),
        queue=RESULTS_QUEUE,
        job_id=result_job_id(late.id, 1),
    )
    await overdue(early, late)
    report = await reconcile(res)
    assert (report.requeued, report.alive) == (1, 1)
    # Then that store_result job is lost too: `late` runs again, later.
    await res.redis.delete(job_key_prefix + result_job_id(late.id, 1))
    await overdue(late)
    report = await reconcile(res)
    assert report.requeued == 1

    first = await Generation.get(id=early.id)
    second = await Generation.get(id=late.id)
    assert first.attempts == second.attempts == 2
    assert first.batch_id != second.batch_id
    for row in (first, second):
        assert row.batch_id is not None
        job_id = batch_job_id(row.batch_id, 2)
        raw = await res.redis.get(job_key_prefix + job_id)
        assert raw is not None, f"{row.id} has no job"
        batch = BatchJob.model_validate(deserialize(raw)["a"][0])
        assert [item.generation_id for item in batch.items] == [row.id]


async def test_out_of_attempts_fails_with_a_reason_and_an_email(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    normal = await make_generation(user, status=Status.QUEUED, attempts=3)
    await Generation.filter(id=normal.id).update(batch_id=normal.id)
    premium = await make_generation(user, tier=Tier.PREMIUM, attempts=3)
    await overdue(normal, premium)

    report = await reconcile(res)

    assert report.failed == 2
    for row in (normal, premium):
        stored = await Generation.get(id=row.id)
        assert stored.status is Status.FAILED
        assert stored.error_code == GAVE_UP_CODE
        assert stored.error_message and "3 times" in stored.error_message
        assert stored.finished_at is not None and stored.deadline is None
        [done] = [e for _, e in await read_events(res.redis, row.id)]
        assert isinstance(done, DoneEvent)
        assert done.status is Status.FAILED and done.error is not None
        assert done.error.code == GAVE_UP_CODE
    # Email delivery (the normal row) gets the failure email; download does not.
    [email] = await OutboxEmail.all()
    assert email.dedupe_key == f"generation:{normal.id}"
    assert email.to_address == user.email
    assert "could not be completed" in email.text_body
    assert email.html_body and "3 times" in email.html_body
    # Failed is final: another round changes nothing.
    assert await reconcile(res) == Report()


async def _leave_result(
    res: JobsResources, row: Generation, *, success: bool, with_images: bool
) -> None:
    """What Redis holds after a node finished and store_result did not store it."""
    png = b"\x89PNG\r\n\x1a\n" + row.id.bytes
    if with_images:
        await res.redis.set(image_key(row.id, 0), png)
    result = GenerationResult(
        generation_id=row.id,
        attempt=row.attempts,
        status=Status.SUCCEEDED,
        images=[
            ImageInfo(
                index=0,
                seed=7,
                width=64,
                height=64,
                sha256=hashlib.sha256(png).hexdigest(),
                size_bytes=len(png),
            )
        ],
        node_id="node-a",
        model=row.model,
        finished_at=utcnow(),
    )
    job_id = result_job_id(row.id, row.attempts)
    now_ms = int(time.time() * 1000)
    # arq's own record of a finished job, as the jobs worker leaves it.
    data = serialize_result(
        STORE_RESULT_FUNCTION,
        (result.model_dump(mode="json"),),
        {},
        5,
        now_ms,
        success,
        "images missing" if success else "ConnectionError: database down",
        now_ms,
        now_ms,
        job_id,
        RESULTS_QUEUE,
        job_id,
        serializer=serialize,
    )
    assert data is not None
    await res.redis.set(result_key_prefix + job_id, data, ex=3600)


async def test_a_result_left_in_redis_is_stored(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    row = await make_generation(user, status=Status.RUNNING, attempts=1)
    await Generation.filter(id=row.id).update(batch_id=row.id)
    await _leave_result(res, row, success=False, with_images=True)
    await overdue(row)

    report = await reconcile(res)

    assert (report.stored, report.requeued) == (1, 0)
    stored = await Generation.get(id=row.id)
    assert stored.status is Status.SUCCEEDED
    assert await GeneratedImage.filter(generation_id=row.id).count() == 1
    assert await OutboxEmail.filter(dedupe_key=f"generation:{row.id}").exists()
    events = [e for _, e in await read_events(res.redis, row.id)]
    assert isinstance(events[-1], DoneEvent)


async def test_a_result_without_its_images_runs_again(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    row = await make_generation(user, tier=Tier.PREMIUM, status=Status.RUNNING)
    await _leave_result(res, row, success=True, with_images=False)
    await overdue(row)

    report = await reconcile(res)

    assert (report.stored, report.requeued) == (0, 1)
    assert (await Generation.get(id=row.id)).attempts == 2


async def test_a_pending_store_result_is_waited_for(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    row = await make_generation(user, tier=Tier.PREMIUM, status=Status.RUNNING)
    # The node finished; storing waits on the results queue (e.g. retrying).
    await enqueue(
        res.redis,
        STORE_RESULT_FUNCTION,
        generation_job(row, 1),
        queue=RESULTS_QUEUE,
        job_id=result_job_id(row.id, 1),
    )
    await overdue(row)

    report = await reconcile(res)

    assert (report.alive, report.requeued) == (1, 0)
    assert (await Generation.get(id=row.id)).attempts == 1


async def test_two_reconcilers_enqueue_a_lost_job_once(
    jobs_settings: JobsSettings,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(open_database(jobs_settings.database_url or ""))
        build = make_resources(jobs_settings, stack)
        first, second = await build(), await build()
        await announce_node(first, max_batch=4)
        user = (await make_user(premium=False)).user
        rows = [await make_generation(user, seed=i) for i in range(8)]
        await dispatch_due(first)
        premium = [
            await make_generation(user, tier=Tier.PREMIUM, seed=i) for i in range(4)
        ]
        await first.redis.flushdb()
        await overdue(*rows, *premium)

        reports = await asyncio.gather(reconcile(first), reconcile(second))

        assert sum(r.requeued for r in reports) == len(rows) + len(premium)
        for row in [*rows, *premium]:
            assert (await Generation.get(id=row.id)).attempts == 2
        assert await first.redis.zcard(premium_queue("tiny")) == len(premium)
        assert await first.redis.zcard(batch_queue("tiny")) == 2


async def test_a_premium_request_nobody_takes_fails_and_leaves_the_queue(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    limit = res.settings.premium_max_queued
    waiting = await make_generation(user, tier=Tier.PREMIUM)
    running = await make_generation(user, tier=Tier.PREMIUM, seed=2)
    fresh = await make_generation(user, tier=Tier.PREMIUM, seed=3)
    for row in (waiting, running, fresh):
        await enqueue_generation(
            res.redis, generation_job(row, 1), owner=str(row.user_id)
        )
    old = utcnow() - timedelta(seconds=limit + 1)
    await Generation.filter(id__in=[waiting.id, running.id]).update(created_at=old)
    # A node took `running` a moment ago; its row will say so any moment.
    await res.redis.set(in_progress_key_prefix + generation_job_id(running.id), b"1")

    report = await reconcile(res)

    assert report.expired == 1
    stored = await Generation.get(id=waiting.id)
    assert stored.status is Status.FAILED
    assert stored.error_code == UNAVAILABLE_CODE
    assert stored.error_message and "15 minutes" in stored.error_message
    [done] = [e for _, e in await read_events(res.redis, waiting.id)]
    assert isinstance(done, DoneEvent) and done.error is not None
    assert done.error.code == UNAVAILABLE_CODE
    queue = premium_queue(waiting.model)
    left = {job.decode() for job in await res.redis.zrange(queue, 0, -1)}
    assert left == {generation_job_id(running.id), generation_job_id(fresh.id)}
    assert not await job_is_live(res.redis, generation_job_id(waiting.id))
    for row in (running, fresh):
        assert (await Generation.get(id=row.id)).status is Status.QUEUED


async def test_a_batch_nobody_takes_fails_with_an_email(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    await announce_node(res, max_batch=4)
    user = (await make_user(premium=False)).user
    rows = [await make_generation(user, seed=i) for i in range(2)]
    await dispatch_due(res)
    batch_id = (await Generation.get(id=rows[0].id)).batch_id
    assert batch_id is not None
    # The model's only node went away hours ago; the job waits on its queue.
    old = utcnow() - timedelta(seconds=res.settings.batch_max_queued + 1)
    await Generation.filter(id__in=[row.id for row in rows]).update(queued_at=old)

    report = await reconcile(res)

    assert report.expired == 2
    for row in rows:
        stored = await Generation.get(id=row.id)
        assert (stored.status, stored.error_code) == (Status.FAILED, UNAVAILABLE_CODE)
    assert await res.redis.zcard(batch_queue(rows[0].model)) == 0
    assert not await job_is_live(res.redis, batch_job_id(batch_id))
    emails = await OutboxEmail.all()
    assert sorted(email.dedupe_key for email in emails) == sorted(
        f"generation:{row.id}" for row in rows
    )
    assert all("6 hours" in email.text_body for email in emails)


async def test_a_request_scheduled_long_ago_for_an_unserved_model_fails(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    wait = res.settings.scheduled_max_wait
    stale = await make_generation(
        user, model="gone", scheduled_for=utcnow() - timedelta(seconds=wait + 1)
    )
    recent = await make_generation(
        user, model="gone", scheduled_for=utcnow() - timedelta(seconds=wait - 60)
    )

    report = await reconcile(res)

    assert report.expired == 1
    stored = await Generation.get(id=stale.id)
    assert (stored.status, stored.error_code) == (Status.FAILED, UNAVAILABLE_CODE)
    assert stored.error_message and "'gone'" in stored.error_message
    assert (await Generation.get(id=recent.id)).status is Status.SCHEDULED
    [email] = await OutboxEmail.all()
    assert email.dedupe_key == f"generation:{stale.id}"
    [done] = [e for _, e in await read_events(res.redis, stale.id)]
    assert isinstance(done, DoneEvent)


async def test_a_job_that_keeps_failing_is_given_up_and_the_rest_go_on(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    bad = await make_generation(user, tier=Tier.PREMIUM)
    good = await make_generation(user, tier=Tier.PREMIUM, seed=2)
    # The stored request lost a parameter: no job can be built from it.
    request = dict(bad.request)
    del request["steps"]
    await Generation.filter(id=bad.id).update(request=request)

    limit = res.settings.reconcile_max_failures
    for round_ in range(limit):
        await overdue(bad, good)
        report = await reconcile(res)
        if round_ == 0:
            assert report.requeued == 1  # the good one, the first time
        stored = await Generation.get(id=bad.id)
        expected = Status.FAILED if round_ == limit - 1 else Status.QUEUED
        assert stored.status is expected, round_

    assert report.failed == 1
    stored = await Generation.get(id=bad.id)
    assert stored.error_code == "internal_error"
    assert stored.attempts == 1
    [done] = [e for _, e in await read_events(res.redis, bad.id)]
    assert isinstance(done, DoneEvent)
    assert (await Generation.get(id=good.id)).attempts == 2
    assert not await res.redis.keys("sdapi:reconcile:failures:*")


async def test_a_round_that_succeeds_resets_the_failure_count(
    jobs_resources: JobsResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    row = await make_generation(user, tier=Tier.PREMIUM, status=Status.RUNNING)
    await enqueue_generation(res.redis, generation_job(row, 1), owner=str(row.user_id))
    real_push = reconciler._push_deadline
    failing = True

    async def flaky_push(*args: Any) -> int:
        if failing:
            raise RuntimeError("a passing glitch")
        return await real_push(*args)

    monkeypatch.setattr(reconciler, "_push_deadline", flaky_push)
    for _ in range(res.settings.reconcile_max_failures - 1):
        await overdue(row)
        await reconcile(res)
    failing = False
    await overdue(row)
    assert (await reconcile(res)).alive == 1
    failing = True
    await overdue(row)
    await reconcile(res)
    assert (await Generation.get(id=row.id)).status is Status.RUNNING

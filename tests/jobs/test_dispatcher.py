"""The normal-tier dispatcher against the real database and Redis, in-process."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import timedelta
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix

from jobs import dispatcher
from jobs.dispatcher import dispatch_due, generation_job, plan_batches, send_batch
from jobs.resources import JobsResources
from jobs.settings import JobsSettings
from sdapi.contract.events import DoneEvent, QueuedEvent
from sdapi.contract.names import BATCH_FUNCTION, batch_job_id, batch_queue
from sdapi.contract.payloads import BatchJob
from sdapi.contract.status import Status, Tier
from sdapi.db.connection import open_database
from sdapi.db.models import Generation, OutboxEmail, utcnow
from sdapi.devtools.accounts import make_user
from sdapi.devtools.net import free_port
from sdapi.infra.queue import deserialize
from sdapi.infra.streams import read_events
from tests.jobs.conftest import (
    MODEL,
    announce_node,
    make_generation,
    make_resources,
)


async def queued_batches(res: JobsResources, model: str = MODEL) -> list[BatchJob]:
    """The batch jobs on the model's batch queue, by their oldest request.

    (arq orders jobs enqueued in the same millisecond by id, so the batches of
    one dispatch round may sit in the queue in any order.)
    """
    ids = await res.redis.zrange(batch_queue(model), 0, -1)
    batches = []
    for raw_id in ids:
        raw = await res.redis.get(job_key_prefix + raw_id.decode())
        job: dict[str, Any] = deserialize(raw)
        assert job["f"] == BATCH_FUNCTION
        batches.append(BatchJob.model_validate(job["a"][0]))
    oldest = {
        row.id: (row.scheduled_for, row.created_at)
        for row in await Generation.filter(
            id__in=[item.generation_id for b in batches for item in b.items]
        )
    }
    return sorted(batches, key=lambda b: oldest[b.items[0].generation_id])


async def take_from_queue(res: JobsResources, batch: BatchJob) -> None:
    """A batch finished: its job left the queue and its results were stored."""
    job_id = batch_job_id(batch.batch_id, batch.attempt)
    await res.redis.zrem(batch_queue(batch.model), job_id)
    await res.redis.delete(job_key_prefix + job_id)
    await Generation.filter(id__in=[item.generation_id for item in batch.items]).update(
        status=Status.SUCCEEDED, finished_at=utcnow(), deadline=None
    )


async def test_groups_by_parameters_and_cuts_by_images(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    await announce_node(res, max_batch=4)
    users = [(await make_user(premium=False)).user for _ in range(3)]
    start = utcnow() - timedelta(minutes=5)
    rows = []
    # Two parameter groups, six requests each, alternating (oldest first).
    for i in range(12):
        rows.append(
            await make_generation(
                users[i % 3],
                prompt=f"prompt {i}",
                seed=100 + i,
                steps=2 if i % 2 == 0 else 3,
                scheduled_for=start + timedelta(seconds=i),
            )
        )
    res.settings = res.settings.model_copy(update={"dispatch_batches_per_node": 10})

    assert await dispatch_due(res) == 4
    batches = await queued_batches(res)
    assert [b.image_count for b in batches] == [4, 4, 2, 2]
    assert [b.items[0].params.steps for b in batches] == [2, 3, 2, 3]
    dispatched = [item.generation_id for b in batches for item in b.items]
    assert sorted(dispatched) == sorted(row.id for row in rows)
    # Oldest first within each group.
    assert [item.params.prompt for item in batches[0].items] == [
        "prompt 0",
        "prompt 2",
        "prompt 4",
        "prompt 6",
    ]
    for batch in batches:
        assert batch.attempt == 1
        for item in batch.items:
            row = await Generation.get(id=item.generation_id)
            assert row.status is Status.QUEUED
            assert row.batch_id == batch.batch_id
            assert row.attempts == 1
            assert row.queued_at is not None and row.deadline is not None
            assert row.deadline > utcnow() + timedelta(seconds=20)
            assert item.params.seed == row.request["seed"]
            assert item.tier is Tier.NORMAL
            events = [e for _, e in await read_events(res.redis, row.id)]
            assert events and isinstance(events[-1], QueuedEvent)
    # Nothing is dispatched twice.
    assert await dispatch_due(res) == 0


async def test_batches_take_users_in_turns(jobs_resources: JobsResources) -> None:
    """No user fills a batch while others' due rows wait: a heavy user's
    oldest row, then each light user's, then the heavy user's next."""
    res = jobs_resources
    await announce_node(res, max_batch=4)
    heavy, light_a, light_b = [(await make_user(premium=False)).user for _ in range(3)]
    start = utcnow() - timedelta(minutes=5)
    names = {}
    for i in range(8):
        row = await make_generation(
            heavy, seed=i, scheduled_for=start + timedelta(seconds=i)
        )
        names[row.id] = f"H{i + 1}"
    for name, user, at in (("A", light_a, 20), ("B", light_b, 30)):
        row = await make_generation(user, scheduled_for=start + timedelta(seconds=at))
        names[row.id] = name
    res.settings = res.settings.model_copy(update={"dispatch_batches_per_node": 10})
    assert await dispatch_due(res) == 3
    ids = await res.redis.zrange(batch_queue(MODEL), 0, -1)
    batches = {
        tuple(names[item.generation_id] for item in batch.items)
        for batch in await queued_batches(res)
    }
    assert len(ids) == 3
    assert batches == {
        ("H1", "A", "B", "H2"),
        ("H3", "H4", "H5", "H6"),
        ("H7", "H8"),
    }


async def test_one_round_looks_at_every_users_first_rows(
    jobs_resources: JobsResources,
) -> None:
    """A heavy user's backlog, older than the round's scan limit, does not
    keep a light user's due row out of the round."""
    res = jobs_resources
    await announce_node(res, max_batch=2)
    heavy, light = [(await make_user(premium=False)).user for _ in range(2)]
    start = utcnow() - timedelta(minutes=5)
    backlog = [
        await make_generation(heavy, seed=i, scheduled_for=start + timedelta(seconds=i))
        for i in range(6)
    ]
    late = await make_generation(light, scheduled_for=start + timedelta(minutes=1))
    res.settings = res.settings.model_copy(
        update={"dispatch_batches_per_node": 1, "dispatch_scan_limit": 3}
    )
    assert await dispatch_due(res) == 1
    [batch] = await queued_batches(res)
    assert [item.generation_id for item in batch.items] == [backlog[0].id, late.id]
    left = await Generation.filter(status=Status.SCHEDULED).values_list("id", flat=True)
    assert sorted(left) == sorted(row.id for row in backlog[1:])


async def test_counts_images_not_rows(jobs_resources: JobsResources) -> None:
    res = jobs_resources
    await announce_node(res, max_batch=4)
    user = (await make_user(premium=False)).user
    start = utcnow() - timedelta(minutes=1)
    for i, images in enumerate([3, 2, 1, 4, 1]):
        await make_generation(
            user,
            seed=i,
            num_images=images,
            scheduled_for=start + timedelta(seconds=i),
        )
    res.settings = res.settings.model_copy(update={"dispatch_batches_per_node": 10})
    await dispatch_due(res)
    batches = await queued_batches(res)
    # 3 | 2+1 (then 4 does not fit) | 4 | 1
    assert [[i.params.num_images for i in b.items] for b in batches] == [
        [3],
        [2, 1],
        [4],
        [1],
    ]


async def test_a_row_larger_than_the_max_batch_goes_alone(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    await announce_node(res, max_batch=2)
    user = (await make_user(premium=False)).user
    big = await make_generation(user, num_images=4)
    await dispatch_due(res)
    [batch] = await queued_batches(res)
    assert [item.generation_id for item in batch.items] == [big.id]


async def test_fills_the_batch_queue_only_up_to_the_bound(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    await announce_node(res, max_batch=2)
    user = (await make_user(premium=False)).user
    start = utcnow() - timedelta(minutes=1)
    rows = [
        await make_generation(user, seed=i, scheduled_for=start + timedelta(seconds=i))
        for i in range(10)
    ]
    # One node, two batches per node: two batches of two, the oldest rows.
    assert await dispatch_due(res) == 2
    first = await queued_batches(res)
    assert [i.generation_id for b in first for i in b.items] == [r.id for r in rows[:4]]
    assert await dispatch_due(res) == 0
    assert await Generation.filter(status=Status.SCHEDULED).count() == 6

    # A node finishes one batch: one more goes, the next oldest.
    await take_from_queue(res, first[0])
    assert await dispatch_due(res) == 1
    third = (await queued_batches(res))[-1]
    assert [i.generation_id for i in third.items] == [r.id for r in rows[4:6]]

    # A second node doubles the room.
    await announce_node(res, max_batch=2, node_id="node-b")
    assert await dispatch_due(res) == 2
    assert await Generation.filter(status=Status.SCHEDULED).count() == 0


async def test_leaves_rows_that_are_not_due_cancelled_premium_or_unserved(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    await announce_node(res, max_batch=4)
    user = (await make_user(premium=False)).user
    later = await make_generation(user, scheduled_for=utcnow() + timedelta(hours=1))
    cancelled = await make_generation(user, status=Status.CANCELLED)
    premium = await make_generation(user, tier=Tier.PREMIUM)
    unserved = await make_generation(user, model="other-model")
    due = await make_generation(user)

    assert await dispatch_due(res) == 1
    [batch] = await queued_batches(res)
    assert [item.generation_id for item in batch.items] == [due.id]
    for row, status in (
        (later, Status.SCHEDULED),
        (cancelled, Status.CANCELLED),
        (premium, Status.QUEUED),
        (unserved, Status.SCHEDULED),
    ):
        stored = await Generation.get(id=row.id)
        assert stored.status is status
        assert stored.batch_id is None
    assert await res.redis.zcard(batch_queue("other-model")) == 0


async def test_a_partial_batch_waits_out_the_window_for_more_rows(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    res.settings = res.settings.model_copy(update={"dispatch_window": 60})
    await announce_node(res, max_batch=4)
    user = (await make_user(premium=False)).user
    now = utcnow()
    first = [
        await make_generation(user, seed=i, scheduled_for=now - timedelta(seconds=5))
        for i in range(3)
    ]
    # Three of four images, due for 5 s of a 60 s window: they wait.
    assert await dispatch_due(res) == 0
    fourth = await make_generation(user, seed=3)
    fifth = await make_generation(user, seed=4)
    # Full now: the four oldest go; the fifth waits for company.
    assert await dispatch_due(res) == 1
    [batch] = await queued_batches(res)
    assert [i.generation_id for i in batch.items] == [r.id for r in [*first, fourth]]
    assert (await Generation.get(id=fifth.id)).status is Status.SCHEDULED
    # Its window over, it goes alone.
    await Generation.filter(id=fifth.id).update(
        scheduled_for=now - timedelta(seconds=61)
    )
    assert await dispatch_due(res) == 1
    assert (await Generation.get(id=fifth.id)).status is Status.QUEUED


async def test_no_healthy_node_keeps_rows_scheduled(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    row = await make_generation(user)
    assert await dispatch_due(res) == 0
    assert (await Generation.get(id=row.id)).status is Status.SCHEDULED
    await announce_node(res, max_batch=4)
    assert await dispatch_due(res) == 1


async def test_a_cancel_waiting_on_the_lock_sees_the_row_queued(
    jobs_resources: JobsResources,
) -> None:
    """A cancelled row is never dispatched; a dispatched one stays cancellable."""
    res = jobs_resources
    await announce_node(res, max_batch=4)
    user = (await make_user(premium=False)).user
    keep = await make_generation(user, seed=1)
    drop = await make_generation(user, seed=2)
    await Generation.filter(id=drop.id, status__in=[Status.SCHEDULED]).update(
        status=Status.CANCELLED
    )
    await dispatch_due(res)
    [batch] = await queued_batches(res)
    assert [item.generation_id for item in batch.items] == [keep.id]


async def test_two_dispatchers_never_take_the_same_row(
    jobs_settings: JobsSettings,
) -> None:
    settings = jobs_settings.model_copy(
        update={"dispatch_batches_per_node": 100, "dispatch_scan_limit": 7}
    )
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(open_database(settings.database_url or ""))
        build = make_resources(settings, stack)
        first, second = await build(), await build()
        await announce_node(first, max_batch=3)
        users = [(await make_user(premium=False)).user for _ in range(3)]
        rows = [
            await make_generation(users[i % 3], seed=i, steps=2 + i % 2)
            for i in range(60)
        ]
        for _ in range(20):
            await asyncio.gather(dispatch_due(first), dispatch_due(second))
        batches = await queued_batches(first)
        dispatched = [item.generation_id for b in batches for item in b.items]
        assert len(dispatched) == len(set(dispatched)) == len(rows)
        for batch in batches:
            assert batch.image_count <= 3
            for item in batch.items:
                stored = await Generation.get(id=item.generation_id)
                assert stored.batch_id == batch.batch_id


async def test_a_failed_enqueue_leaves_rows_queued_for_the_reconciler(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    user = (await make_user(premium=False)).user
    row = await make_generation(user, status=Status.QUEUED, attempts=1)
    batch = BatchJob(batch_id=uuid.uuid4(), model=MODEL, items=[generation_job(row, 1)])
    # Nothing listens there: every Redis command fails to connect.
    broken = ArqRedis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        ok = await send_batch(
            JobsResources(
                settings=res.settings,
                redis=broken,
                registry=res.registry,
                stack=res.stack,
                stores=res.stores,
            ),
            batch,
        )
    finally:
        await broken.aclose()
    assert ok is False
    assert (await Generation.get(id=row.id)).status is Status.QUEUED


def test_plan_batches_keeps_groups_apart_and_oldest_first() -> None:
    def row(
        steps: int, images: int, scheduler: str = "euler", **inputs: object
    ) -> Generation:
        request = {
            "prompt": "a boat",
            "width": 64,
            "height": 64,
            "steps": steps,
            "guidance_scale": 5.0,
            "seed": 1,
            "num_images": images,
            "scheduler": scheduler,
            **inputs,
        }
        return Generation(
            id=uuid.uuid4(),
            request=request,
            width=64,
            height=64,
            steps=steps,
            guidance_scale=5.0,
            scheduler=scheduler,
            num_images=images,
            attempts=0,
        )

    image = {"init_image_sha256": "a" * 64}
    rows = [
        row(2, 1),
        row(3, 1),
        row(2, 2),
        row(2, 1, "ddim"),
        row(2, 2),
        # Other modes and strengths are other pipelines or step counts.
        row(2, 1, **image, strength=0.5),
        row(2, 1, **image, mask_sha256="b" * 64, strength=0.5),
        row(2, 1, **image, strength=0.7),
        row(2, 1, init_image_sha256="c" * 64, strength=0.5),
    ]
    plan = plan_batches(rows, max_batch=3)
    assert [[r.id for r in b.rows] for b in plan] == [
        [rows[0].id, rows[2].id],
        [rows[1].id],
        [rows[3].id],
        [rows[4].id],
        [rows[5].id, rows[8].id],
        [rows[6].id],
        [rows[7].id],
    ]
    assert [b.images for b in plan] == [3, 1, 1, 2, 2, 1, 1]


async def test_two_dispatchers_never_overfill_the_batch_queue(
    jobs_settings: JobsSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each round locks only two rows, so the other process finds rows of its own.
    settings = jobs_settings.model_copy(update={"dispatch_scan_limit": 2})
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(open_database(settings.database_url or ""))
        build = make_resources(settings, stack)
        first, second = await build(), await build()
        await announce_node(first, max_batch=1)
        user = (await make_user(premium=False)).user
        for i in range(8):
            await make_generation(user, seed=i)
        # Each process enqueues only after the other one has had its go, as
        # under load: the other one must count the committed batches, not
        # only Redis's jobs. A send waits until both processes are sending
        # or done.
        real_send = dispatcher.send_batch
        arrivals = 0
        both_looked = asyncio.Event()

        def arrive() -> None:
            nonlocal arrivals
            arrivals += 1
            if arrivals >= 2:
                both_looked.set()

        async def late_send(res: JobsResources, batch: BatchJob) -> bool:
            arrive()
            await both_looked.wait()
            return await real_send(res, batch)

        async def dispatch(res: JobsResources) -> int:
            try:
                return await dispatch_due(res)
            finally:
                arrive()

        monkeypatch.setattr(dispatcher, "send_batch", late_send)
        async with asyncio.timeout(30):
            sent = await asyncio.gather(dispatch(first), dispatch(second))

        # One node, two batches per node.
        assert sum(sent) == 2
        assert await first.redis.zcard(batch_queue(MODEL)) == 2
        assert await Generation.filter(status=Status.QUEUED).count() == 2


async def test_a_row_that_cannot_become_a_job_fails_and_the_rest_go(
    jobs_resources: JobsResources,
) -> None:
    res = jobs_resources
    await announce_node(res, max_batch=4)
    user = (await make_user(premium=False)).user
    good = await make_generation(user, seed=1)
    lacking = await make_generation(user, seed=2)
    invalid = await make_generation(user, seed=3)
    request = dict(lacking.request)
    del request["prompt"]
    await Generation.filter(id=lacking.id).update(request=request)
    await Generation.filter(id=invalid.id).update(
        request={**invalid.request, "width": "wide"}
    )

    assert await dispatch_due(res) == 1

    [batch] = await queued_batches(res)
    assert [item.generation_id for item in batch.items] == [good.id]
    for row in (lacking, invalid):
        stored = await Generation.get(id=row.id)
        assert stored.status is Status.FAILED
        assert stored.error_code == "internal_error"
        assert stored.error_message and "submit it again" in stored.error_message
        [done] = [event for _, event in await read_events(res.redis, row.id)]
        assert isinstance(done, DoneEvent)
        assert done.error is not None and done.error.code == "internal_error"
    # Email delivery: the user hears about it.
    emails = await OutboxEmail.filter(
        dedupe_key__in=[f"generation:{lacking.id}", f"generation:{invalid.id}"]
    ).count()
    assert emails == 2
    # Nothing is left to trip over next round.
    assert await dispatch_due(res) == 0


async def test_one_models_failure_does_not_stop_the_others(
    jobs_resources: JobsResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = jobs_resources
    await announce_node(res, max_batch=4, node_id="node-a", model="broken")
    await announce_node(res, max_batch=4, node_id="node-b", model=MODEL)
    user = (await make_user(premium=False)).user
    await make_generation(user, model="broken")
    fine = await make_generation(user)
    real_claim = dispatcher._claim

    async def claim(res: JobsResources, model: str, offer: Any) -> Any:
        if model == "broken":
            raise RuntimeError("a bug that only this model hits")
        return await real_claim(res, model, offer)

    monkeypatch.setattr(dispatcher, "_claim", claim)
    assert await dispatch_due(res) == 1
    assert (await Generation.get(id=fine.id)).status is Status.QUEUED

"""The normal-tier dispatcher: due `scheduled` rows become batch jobs.

Every round, per model that a healthy node serves: lock due rows with
``SELECT ... FOR UPDATE SKIP LOCKED`` (so two `jobs` processes never take the
same row), group compatible ones into batches of at most the nodes' max batch
(counted in images), mark them `queued` in the same transaction, and only
after the commit put one batch job per group on the model's batch queue. If
that enqueue fails the rows stay `queued` and the reconciler re-enqueues them
once their deadline passes.

A batch that is not full waits up to `dispatch_window` seconds after its
oldest row became due for more compatible rows: requests that arrived close
together run together instead of in several small pipeline calls.

The batch queue is filled only up to `dispatch_batches_per_node` batches per
healthy node, so a premium request waits behind at most the batch its node is
running (the node serves its premium queue first and preempts a batch at step
boundaries) and the database, not Redis, holds the backlog.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from redis.exceptions import RedisError
from tortoise.transactions import in_transaction

from gpu_node.schemas import (
    BatchJob,
    GenerationJob,
    GenerationParams,
    QueuedEvent,
    Status,
    Tier,
    batch_job_id,
    batch_queue,
)
from jobs.worker import JobsResources
from sdapi.events import append_event
from sdapi.queue import enqueue_batch, queue_depth, queue_position
from web.models import Generation, utcnow

log = logging.getLogger(__name__)

# Rows that may share a pipeline call: size, steps, guidance, scheduler, and
# the attempt, so every row of a batch derives the batch's job id
# (batch_job_id(batch_id, attempts)) from its own columns.
GroupKey = tuple[int, int, int, float, str, int]


@dataclass
class PlannedBatch:
    """Rows that go to the GPU together, oldest first."""

    key: GroupKey
    rows: list[Generation] = field(default_factory=list)
    images: int = 0
    # A later row of the group did not fit: nothing more can join this batch.
    closed: bool = False

    def ready(self, now: datetime, max_batch: int, window: timedelta) -> bool:
        """Full, or its oldest row has waited out the batch window."""
        if self.closed or self.images >= max_batch:
            return True
        oldest: datetime | None = self.rows[0].scheduled_for
        return oldest is None or oldest <= now - window


def group_key(row: Generation) -> GroupKey:
    """What rows must share to run in one batch."""
    return (
        row.width,
        row.height,
        row.steps,
        row.guidance_scale,
        row.scheduler,
        row.attempts,
    )


def plan_batches(rows: list[Generation], max_batch: int) -> list[PlannedBatch]:
    """Group `rows` (oldest first) into batches of at most `max_batch` images.

    Batches come out in the order of their oldest row, so taking a prefix
    serves the oldest requests first. A row with more images than `max_batch`
    goes alone (the node splits its pipeline calls).
    """
    batches: list[PlannedBatch] = []
    open_batches: dict[GroupKey, PlannedBatch] = {}
    for row in rows:
        key = group_key(row)
        batch = open_batches.get(key)
        if batch is None or batch.images + row.num_images > max_batch:
            if batch is not None:
                batch.closed = True
            batch = PlannedBatch(key)
            batches.append(batch)
            open_batches[key] = batch
        batch.rows.append(row)
        batch.images += row.num_images
    return batches


def generation_params(row: Generation) -> GenerationParams:
    """The node's view of a stored generation (from its resolved request)."""
    request: dict[str, Any] = row.request
    return GenerationParams.model_validate(
        {name: request[name] for name in GenerationParams.model_fields}
    )


def generation_job(row: Generation, attempt: int) -> GenerationJob:
    """One generation as the node receives it (alone or as a batch item)."""
    return GenerationJob(
        generation_id=row.id,
        model=row.model,
        tier=Tier(row.tier),
        params=generation_params(row),
        attempt=attempt,
    )


async def send_batch(res: JobsResources, batch: BatchJob) -> bool:
    """Enqueue a committed batch and tell its generations; False if Redis failed.

    A failure leaves the rows `queued` without a job: the reconciler finds them
    once their deadline passes.
    """
    try:
        if not await enqueue_batch(res.redis, batch):
            log.warning(
                "batch %s attempt %s already queued", batch.batch_id, batch.attempt
            )
        position = await queue_position(
            res.redis,
            batch_queue(batch.model),
            batch_job_id(batch.batch_id, batch.attempt),
        )
        for item in batch.items:
            await append_event(
                res.redis, item.generation_id, QueuedEvent(position=position or 0)
            )
    except (RedisError, OSError):
        log.warning(
            "enqueue of batch %s failed; the reconciler will retry it", batch.batch_id
        )
        return False
    return True


async def _claim(
    res: JobsResources, model: str, max_batch: int, room: int
) -> list[BatchJob]:
    """Lock due rows of `model`, mark up to `room` batches queued, and commit."""
    settings = res.settings
    now = utcnow()
    async with in_transaction():
        rows = list(
            await Generation.select_for_update(skip_locked=True)
            .filter(
                status=Status.SCHEDULED,
                tier=Tier.NORMAL,
                model=model,
                scheduled_for__lte=now,
            )
            .order_by("scheduled_for", "created_at")
            .limit(settings.dispatch_scan_limit)
        )
        jobs: list[BatchJob] = []
        deadline = now + timedelta(seconds=settings.queued_check_after)
        window = timedelta(seconds=settings.dispatch_window)
        ready = [
            b for b in plan_batches(rows, max_batch) if b.ready(now, max_batch, window)
        ]
        for planned in ready[:room]:
            batch_id = uuid.uuid4()
            attempt = planned.key[-1] + 1
            ids = [row.id for row in planned.rows]
            # The rows are locked by this transaction; the status condition
            # still guards against a path that did not lock first.
            updated = await Generation.filter(
                id__in=ids, status=Status.SCHEDULED
            ).update(
                status=Status.QUEUED,
                batch_id=batch_id,
                attempts=attempt,
                queued_at=now,
                deadline=deadline,
            )
            if updated != len(ids):
                raise RuntimeError(f"locked rows of batch {batch_id} changed under us")
            jobs.append(
                BatchJob(
                    batch_id=batch_id,
                    model=model,
                    items=[generation_job(row, attempt) for row in planned.rows],
                    attempt=attempt,
                )
            )
    return jobs


async def dispatch_due(res: JobsResources) -> int:
    """One dispatch round over every served model; the batches it committed."""
    sent = 0
    offers = await res.registry.offers()
    for model, offer in offers.items():
        if not offer.available or offer.nodes < 1:
            continue  # no healthy node: its rows stay scheduled
        waiting = await queue_depth(res.redis, batch_queue(model))
        room = res.settings.dispatch_batches_per_node * offer.nodes - waiting
        if room < 1:
            continue
        for batch in await _claim(res, model, offer.max_batch, room):
            await send_batch(res, batch)
            sent += 1
    return sent

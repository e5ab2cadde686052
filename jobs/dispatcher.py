"""The normal-tier dispatcher: due `scheduled` rows become batch jobs.

Rows are claimed with `SKIP LOCKED`, grouped by the batch key, marked
`queued` and enqueued after the commit; docs/ARCHITECTURE.md has the design.

Fair packing: due rows are taken in turns by user (`DUE_IN_TURNS`: each
user's oldest due row, then each one's second, and so on; the oldest first
within a turn), so no user fills a batch, or the rows one round looks at,
while other users' due rows wait. Batches go out in the order of their first
row in that order.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.queryset import QuerySet
from tortoise.transactions import in_transaction

from jobs.resources import JobsResources
from jobs.results import TRANSIENT_ERRORS, announce_done, fail_generations
from sdapi.contract.events import QueuedEvent
from sdapi.contract.names import batch_job_id, batch_queue, dispatch_lock_key
from sdapi.contract.payloads import (
    BatchJob,
    ErrorInfo,
    GenerationJob,
    GenerationParams,
)
from sdapi.contract.status import Status, Tier
from sdapi.db.connection import table_name
from sdapi.db.input_images import put_inputs
from sdapi.db.models import Generation, utcnow
from sdapi.infra.object_store import StoreUnavailable
from sdapi.infra.queue import enqueue_batch, queue_depth, queue_position
from sdapi.infra.registry import ModelOffer
from sdapi.infra.streams import append_event

log = logging.getLogger(__name__)

# Rows that may share a pipeline call: size, steps, guidance, scheduler.
# (Every scheduled row is on its first attempt, so a batch is too.)
GroupKey = tuple[object, ...]

# A dispatch round ends on these (the database or Redis is down); any other
# error stops one model's round only.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, RedisError)

INTERNAL_ERROR_CODE = "internal_error"


class UnbuildableRow(ValueError):
    """A stored generation that cannot be turned into a GPU job."""


# The ids of a model's due rows, in turns by user: a user's n-th oldest row
# ranks with every other user's n-th, oldest first among them. (FOR UPDATE
# cannot take a window function: the rows are locked by id afterwards.)
DUE_IN_TURNS = """
SELECT id FROM (
  SELECT id, scheduled_for, created_at,
         row_number() OVER (
           PARTITION BY user_id ORDER BY scheduled_for, created_at, id
         ) AS turn
  FROM {table}
  WHERE status = $1 AND tier = $2 AND model = $3 AND scheduled_for <= $4
) due
ORDER BY turn, scheduled_for, created_at, id
LIMIT $5
"""


@dataclass
class PlannedBatch:
    """Rows that go to the GPU together, in the order they were taken."""

    key: GroupKey
    rows: list[Generation] = field(default_factory=list)
    images: int = 0
    # A later row of the group did not fit: nothing more can join this batch.
    closed: bool = False

    def ready(self, now: datetime, max_batch: int, window: timedelta) -> bool:
        """Full, or its oldest row has waited out the batch window."""
        if self.closed or self.images >= max_batch:
            return True
        due = [row.scheduled_for for row in self.rows]
        return None in due or min(d for d in due if d) <= now - window


def group_key(row: Generation) -> GroupKey:
    """What rows must share to run in one batch (`GenerationParams.batch_key`).

    Mode and strength live only in the stored request, so the key comes from
    the node's view of the row, not from its columns.
    """
    return generation_params(row).batch_key()


def plan_batches(rows: list[Generation], max_batch: int) -> list[PlannedBatch]:
    """Group `rows` (in the order they are to be served: in turns by user,
    `DUE_IN_TURNS`) into batches of at most `max_batch` images.

    Batches come out in the order of their first row, so taking a prefix
    serves the rows first in line. A row with more images than `max_batch`
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
    """The node's view of a stored generation (from its resolved request).

    Raises UnbuildableRow when the stored request lacks a parameter or holds
    one the node would refuse.
    """
    request: Any = row.request
    if not isinstance(request, dict):
        raise UnbuildableRow(f"the stored request of {row.id} is not an object")
    try:
        return GenerationParams.from_request(request)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UnbuildableRow(
            f"the stored request of {row.id} is invalid: {where}: {first['msg']}"
        ) from None


def generation_job(row: Generation, attempt: int) -> GenerationJob:
    """One generation as the node receives it (alone or as a batch item)."""
    return GenerationJob(
        generation_id=row.id,
        model=row.model,
        tier=Tier(row.tier),
        params=generation_params(row),
        attempt=attempt,
    )


async def mark_queued(
    rows: QuerySet[Generation],
    count: int,
    *,
    attempt: int,
    batch_id: uuid.UUID | None,
    now: datetime,
    deadline: datetime,
) -> None:
    """Mark `count` locked `rows` queued for `attempt`; they must all match."""
    updated = await rows.update(
        status=Status.QUEUED,
        attempts=attempt,
        batch_id=batch_id,
        queued_at=now,
        started_at=None,
        deadline=deadline,
    )
    if updated != count:
        # The rows are locked by the caller's transaction; the filter still
        # guards against a path that did not lock first.
        raise RuntimeError(f"{count - updated} locked row(s) changed under us")


def unbuildable_error() -> ErrorInfo:
    """What the user reads about a request that could not be handed to a node."""
    return ErrorInfo(
        code=INTERNAL_ERROR_CODE,
        message="The request could not be prepared for a GPU worker (its stored "
        "parameters are invalid). Please submit it again.",
    )


async def send_batch(resources: JobsResources, batch: BatchJob) -> bool:
    """Enqueue a committed batch and tell its generations; False if Redis (or
    the image store its inputs are read from) failed.

    A failure leaves the rows `queued` without a job: the reconciler finds them
    once their deadline passes.
    """
    try:
        # The node fetches inputs by hash: they are in Redis before the job.
        await put_inputs(
            resources.redis,
            resources.stores,
            [item.generation_id for item in batch.items],
        )
        if not await enqueue_batch(resources.redis, batch):
            log.warning(
                "batch %s attempt %s already queued", batch.batch_id, batch.attempt
            )
        position = await queue_position(
            resources.redis,
            batch_queue(batch.model),
            batch_job_id(batch.batch_id, batch.attempt),
        )
        for item in batch.items:
            await append_event(
                resources.redis, item.generation_id, QueuedEvent(position=position or 0)
            )
    except (RedisError, OSError, StoreUnavailable):
        log.warning(
            "enqueue of batch %s failed; the reconciler will retry it", batch.batch_id
        )
        return False
    return True


async def _in_flight(resources: JobsResources, model: str) -> int:
    """Batches of `model` waiting or running: jobs in Redis, or committed rows.

    The database also counts batches committed by another process but not yet
    enqueued, and batches whose job Redis lost (until the reconciler re-runs
    them); Redis also counts jobs whose rows all ended meanwhile.
    """
    batch_ids = await (
        Generation.filter(
            model=model,
            tier=Tier.NORMAL,
            status__in=(Status.QUEUED, Status.RUNNING),
            batch_id__not_isnull=True,
        )
        .distinct()
        .values_list("batch_id", flat=True)
    )
    return max(len(batch_ids), await queue_depth(resources.redis, batch_queue(model)))


async def _due_in_turns(
    connection: BaseDBAsyncClient, model: str, now: datetime, limit: int
) -> list[Generation]:
    """Up to `limit` due rows of `model`, locked (SKIP LOCKED), in turns by
    user: the order `plan_batches` packs them in."""
    found = await connection.execute_query_dict(
        DUE_IN_TURNS.format(table=table_name(Generation)),
        [Status.SCHEDULED.value, Tier.NORMAL.value, model, now, limit],
    )
    place = {row["id"]: n for n, row in enumerate(found)}
    # Locked here; one another dispatcher holds, or that changed meanwhile, is
    # left out.
    locked = await Generation.select_for_update(skip_locked=True).filter(
        id__in=list(place), status=Status.SCHEDULED
    )
    return sorted(locked, key=lambda row: place[row.id])


async def _claim(
    resources: JobsResources, model: str, offer: ModelOffer
) -> tuple[list[BatchJob], list[Generation]]:
    """Mark due rows of `model` queued as batches, as far as there is room.

    Returns the batches to enqueue and the rows that failed because no job
    could be built from them, both committed.
    """
    settings = resources.settings
    max_batch = offer.max_batch
    async with in_transaction() as connection:
        # Held until commit: another process's dispatcher of this model waits,
        # then counts the batches committed here.
        await connection.execute_query(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            [dispatch_lock_key(model)],
        )
        room = settings.dispatch_batches_per_node * offer.nodes - await _in_flight(
            resources, model
        )
        if room < 1:
            return [], []
        now = utcnow()
        rows = await _due_in_turns(connection, model, now, settings.dispatch_scan_limit)
        params: dict[uuid.UUID, GenerationParams] = {}
        broken: list[Generation] = []
        for row in rows:
            try:
                params[row.id] = generation_params(row)
            except UnbuildableRow as exc:
                log.error("generation %s cannot be dispatched: %s", row.id, exc)
                broken.append(row)
        failed = await fail_generations(
            resources, broken, unbuildable_error(), now, statuses=(Status.SCHEDULED,)
        )
        jobs: list[BatchJob] = []
        deadline = now + timedelta(seconds=settings.queued_check_after)
        window = timedelta(seconds=settings.dispatch_window)
        good = [row for row in rows if row.id in params]
        ready = [
            b for b in plan_batches(good, max_batch) if b.ready(now, max_batch, window)
        ]
        attempt = 1
        for planned in ready[:room]:
            batch_id = uuid.uuid4()
            ids = [row.id for row in planned.rows]
            await mark_queued(
                Generation.filter(id__in=ids, status=Status.SCHEDULED),
                len(ids),
                attempt=attempt,
                batch_id=batch_id,
                now=now,
                deadline=deadline,
            )
            items = [
                GenerationJob(
                    generation_id=row.id,
                    model=model,
                    tier=Tier.NORMAL,
                    params=params[row.id],
                    attempt=attempt,
                )
                for row in planned.rows
            ]
            jobs.append(
                BatchJob(batch_id=batch_id, model=model, items=items, attempt=attempt)
            )
    return jobs, failed


async def _dispatch_model(
    resources: JobsResources, model: str, offer: ModelOffer
) -> int:
    jobs, failed = await _claim(resources, model, offer)
    for row in failed:
        await announce_done(resources.redis, row)
    for batch in jobs:
        await send_batch(resources, batch)
    return len(jobs)


async def dispatch_due(resources: JobsResources) -> int:
    """One dispatch round over every served model; the batches it committed."""
    sent = 0
    offers = await resources.registry.offers()
    for model, offer in offers.items():
        if not offer.available or offer.nodes < 1:
            continue  # no healthy node: its rows stay scheduled
        try:
            sent += await _dispatch_model(resources, model, offer)
        except OUTAGE_ERRORS:
            raise  # the database or Redis is down: the whole round waits
        except Exception:
            # One model's trouble must not hold up the others; its traceback
            # is in the log and it is tried again next round.
            log.exception("dispatching %s failed", model)
    return sent

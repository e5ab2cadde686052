"""The reconciler: queued or running work whose job is gone is put back or failed.

Postgres is the truth and Redis may lose anything; the rules are in
docs/ARCHITECTURE.md ("When things go wrong: the reconciler").
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from tortoise.expressions import Q
from tortoise.transactions import in_transaction

from jobs.dispatcher import (
    INTERNAL_ERROR_CODE,
    OUTAGE_ERRORS,
    generation_job,
    mark_queued,
    send_batch,
)
from jobs.resources import JobsResources
from jobs.results import (
    TRANSIENT_ERRORS,
    ResultRejected,
    announce_done,
    fail_generations,
    parse_result,
    save_result,
)
from sdapi.contract.events import QueuedEvent
from sdapi.contract.names import (
    RECONCILE_FAILURES_PREFIX,
    RESULTS_QUEUE,
    batch_job_id,
    batch_queue,
    generation_job_id,
    premium_queue,
    result_job_id,
)
from sdapi.contract.payloads import BatchJob, ErrorInfo, GenerationJob
from sdapi.contract.status import TERMINAL_STATUSES, Status, Tier
from sdapi.db.input_images import put_inputs
from sdapi.db.models import Generation, utcnow
from sdapi.infra.queue import (
    drop_waiting_job,
    enqueue_generation,
    job_is_live,
    job_is_running,
    kept_job_args,
    queue_position,
)
from sdapi.infra.streams import append_event

log = logging.getLogger(__name__)

IN_WORK = (Status.QUEUED, Status.RUNNING)
GAVE_UP_CODE = "attempts_exhausted"
UNAVAILABLE_CODE = "model_unavailable"
# A count older than this (seconds) is forgotten: failures are "in a row" only
# while rounds keep failing.
FAILURES_TTL_S = 3600


class Recovery(Enum):
    """What a row's stored-result check found."""

    PENDING = "pending"  # its store_result job is alive or retrying
    STORED = "stored"  # a result left in Redis made it final just now
    LOST = "lost"  # nothing to store: the work has to run again


@dataclass
class Report:
    """What one reconcile round did, in rows."""

    alive: int = 0
    stored: int = 0
    requeued: int = 0
    failed: int = 0
    expired: int = 0


@dataclass(frozen=True)
class Unit:
    """Rows that share one arq job: a premium generation, or a batch's rows."""

    tier: Tier
    attempt: int
    rows: tuple[Generation, ...]
    batch_id: uuid.UUID | None = None

    @property
    def job_id(self) -> str | None:
        """The arq job the rows wait on (None: a batch row without a batch)."""
        if self.tier is Tier.PREMIUM:
            return generation_job_id(self.rows[0].id, self.attempt)
        if self.batch_id is None:
            return None
        return batch_job_id(self.batch_id, self.attempt)

    @property
    def queue(self) -> str:
        """The arq queue its job waits on."""
        model = self.rows[0].model
        return premium_queue(model) if self.tier is Tier.PREMIUM else batch_queue(model)

    @property
    def key(self) -> str:
        """A name for the unit that outlives a round (for its failure count)."""
        return self.job_id or f"row:{self.rows[0].id}:{self.attempt}"


def _overdue(now: datetime) -> Q:
    return Q(deadline__lt=now) | Q(deadline__isnull=True)


async def _group(rows: list[Generation]) -> list[Unit]:
    """`rows` grouped by the job they share, with their batch's other rows."""
    units: list[Unit] = []
    seen: set[tuple[uuid.UUID, int]] = set()
    for row in rows:
        tier = Tier(row.tier)
        if tier is Tier.PREMIUM or row.batch_id is None:
            units.append(Unit(tier, row.attempts, (row,)))
            continue
        key = (row.batch_id, row.attempts)
        if key in seen:
            continue
        seen.add(key)
        # The whole batch shares the job, also rows not yet past their deadline.
        batch = await Generation.filter(
            batch_id=row.batch_id, attempts=row.attempts, status__in=IN_WORK
        ).order_by("created_at")
        units.append(Unit(tier, row.attempts, tuple(batch), row.batch_id))
    return units


async def _units(resources: JobsResources, now: datetime) -> list[Unit]:
    """Overdue queued/running rows, grouped by the job they share."""
    stuck = list(
        await Generation.filter(_overdue(now), status__in=IN_WORK)
        .order_by("deadline")
        .limit(resources.settings.reconcile_batch_limit)
    )
    return await _group(stuck)


async def _push_deadline(
    resources: JobsResources, ids: list[uuid.UUID], attempt: int, now: datetime
) -> int:
    """Move the deadline of rows whose work is still alive."""
    updated: int = await Generation.filter(
        id__in=ids, status__in=IN_WORK, attempts=attempt
    ).update(deadline=now + timedelta(seconds=resources.settings.queued_check_after))
    return updated


async def _recover(resources: JobsResources, row: Generation) -> Recovery:
    """Finish `row` from its attempt's store_result job if one is alive or left."""
    job_id = result_job_id(row.id, row.attempts)
    if await job_is_live(resources.redis, job_id):
        return Recovery.PENDING
    args = await kept_job_args(resources.redis, job_id, RESULTS_QUEUE)
    if not args:
        return Recovery.LOST
    # The result key keeps the payload the node sent; storing is idempotent.
    try:
        outcome = await save_result(resources, parse_result(args[0]))
    except TRANSIENT_ERRORS:
        return Recovery.PENDING  # the database is down: try again next round
    except ResultRejected:
        log.warning("the left result of %s cannot be stored", row.id, exc_info=True)
        return Recovery.LOST
    log.info("stored the left result of %s: %s", row.id, outcome)
    final = await Generation.filter(id=row.id, status__in=TERMINAL_STATUSES).exists()
    return Recovery.STORED if final else Recovery.LOST


def gave_up_message(attempts: int) -> str:
    """What the user reads when their generation was lost too often."""
    return (
        f"The generation was interrupted {attempts} times (a GPU worker stopped "
        "or the queue was lost) and was given up. Please submit it again."
    )


def _gave_up(row: Generation) -> ErrorInfo:
    return ErrorInfo(code=GAVE_UP_CODE, message=gave_up_message(row.attempts))


def _duration(seconds: float) -> str:
    """`seconds` as a person says it: 15 minutes, 6 hours, 1 day."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = round(seconds / size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{round(seconds)} seconds"


def unavailable_error(model: str, waited_s: float) -> ErrorInfo:
    """What the user reads when no node took their request in time."""
    return ErrorInfo(
        code=UNAVAILABLE_CODE,
        message=f"No GPU worker serving {model!r} took this request within "
        f"{_duration(waited_s)}, so it was given up. Please submit it again later.",
    )


def internal_error() -> ErrorInfo:
    """What the user reads when their request kept failing the reconciler."""
    return ErrorInfo(
        code=INTERNAL_ERROR_CODE,
        message="The request could not be recovered after a failure of the "
        "service. Please submit it again.",
    )


async def _requeue(
    resources: JobsResources, unit: Unit, rows: list[Generation], now: datetime
) -> GenerationJob | BatchJob:
    """Give locked `rows` their next attempt; the job to enqueue after commit."""
    attempt = unit.attempt + 1
    # A fresh batch every time: other rows of the old batch may be re-run
    # later, as a batch of their own with the same attempt number.
    batch_id = None if unit.tier is Tier.PREMIUM else uuid.uuid4()
    jobs = [generation_job(row, attempt) for row in rows]
    await mark_queued(
        Generation.filter(
            id__in=[row.id for row in rows], status__in=IN_WORK, attempts=unit.attempt
        ),
        len(rows),
        attempt=attempt,
        batch_id=batch_id,
        now=now,
        deadline=now + timedelta(seconds=resources.settings.queued_check_after),
    )
    if batch_id is None:
        return jobs[0]
    return BatchJob(batch_id=batch_id, model=rows[0].model, items=jobs, attempt=attempt)


async def _send(
    resources: JobsResources, job: GenerationJob | BatchJob, owner: str
) -> None:
    """Enqueue a re-run after its commit (a failure waits for the next deadline).

    A premium re-run takes its previous attempt's place in the fair order
    (`enqueue_generation`), ahead of work that came after it."""
    if isinstance(job, BatchJob):
        await send_batch(resources, job)
        return
    try:
        # Redis may have lost the inputs with the job: PostgreSQL has them.
        await put_inputs(resources.redis, resources.stores, [job.generation_id])
        await enqueue_generation(resources.redis, job, owner=owner)
        position = await queue_position(
            resources.redis,
            premium_queue(job.model),
            generation_job_id(job.generation_id, job.attempt),
        )
        await append_event(
            resources.redis, job.generation_id, QueuedEvent(position=position or 0)
        )
    except OUTAGE_ERRORS:
        log.warning("re-enqueue of %s failed; retrying later", job.generation_id)


async def _retry_or_fail(
    resources: JobsResources,
    unit: Unit,
    lost: list[uuid.UUID],
    now: datetime,
    report: Report,
) -> None:
    """Re-enqueue lost rows of `unit`, or fail them once out of attempts."""
    failed: list[Generation] = []
    job: GenerationJob | BatchJob | None = None
    async with in_transaction():
        # Locked in id order (no deadlock between two reconcilers); the second
        # one finds the attempt already moved on and does nothing.
        rows = list(
            await Generation.select_for_update()
            .filter(id__in=lost, status__in=IN_WORK, attempts=unit.attempt)
            .order_by("id")
        )
        if not rows or not any(
            row.deadline is None or row.deadline < now for row in rows
        ):
            return
        if unit.attempt >= resources.settings.generation_max_attempts:
            failed = await fail_generations(
                resources, rows, _gave_up, now, statuses=IN_WORK
            )
        else:
            job = await _requeue(resources, unit, rows, now)
    if job is None:
        for row in failed:
            await announce_done(resources.redis, row)
        report.failed += len(failed)
        log.warning(
            "gave up %d generation(s) of job %s after %d attempts",
            len(failed),
            unit.job_id,
            unit.attempt,
        )
        return
    log.info("re-enqueued job %s as attempt %d", unit.job_id, unit.attempt + 1)
    await _send(resources, job, str(rows[0].user_id))
    report.requeued += len(rows)


async def _reconcile_unit(
    resources: JobsResources, unit: Unit, now: datetime, report: Report
) -> None:
    ids = [row.id for row in unit.rows]
    job_id = unit.job_id
    if job_id is not None and await job_is_live(resources.redis, job_id):
        report.alive += await _push_deadline(resources, ids, unit.attempt, now)
        return
    lost: list[uuid.UUID] = []
    for row in unit.rows:
        found = await _recover(resources, row)
        if found is Recovery.PENDING:
            report.alive += await _push_deadline(resources, [row.id], unit.attempt, now)
        elif found is Recovery.STORED:
            report.stored += 1
        else:
            lost.append(row.id)
    if lost:
        await _retry_or_fail(resources, unit, lost, now, report)


async def _fail_unit(
    resources: JobsResources,
    unit: Unit,
    error: ErrorInfo,
    now: datetime,
    *,
    statuses: tuple[Status, ...] = IN_WORK,
) -> list[Generation]:
    """End the rows of `unit` still in `statuses` `failed`; announce them."""
    async with in_transaction():
        rows = await (
            Generation.select_for_update()
            .filter(
                id__in=[row.id for row in unit.rows],
                status__in=statuses,
                attempts=unit.attempt,
            )
            .order_by("id")
        )
        failed = await fail_generations(resources, rows, error, now, statuses=statuses)
    for row in failed:
        await announce_done(resources.redis, row)
    return failed


async def _count_failure(
    resources: JobsResources, unit: Unit, now: datetime, report: Report
) -> None:
    """Count a failed round for `unit`; after too many in a row, fail its rows."""
    key = RECONCILE_FAILURES_PREFIX + unit.key
    failures = int(await resources.redis.incr(key))
    await resources.redis.expire(key, FAILURES_TTL_S)
    limit = resources.settings.reconcile_max_failures
    if failures < limit:
        return
    failed = await _fail_unit(resources, unit, internal_error(), now)
    await resources.redis.delete(key)
    report.failed += len(failed)
    log.error(
        "gave up %d generation(s) of job %s: reconciling failed %d times in a row",
        len(failed),
        unit.key,
        failures,
    )


async def _expire_queued(
    resources: JobsResources, now: datetime, report: Report
) -> None:
    """Fail queued work no node took in time, and take its jobs off the queues."""
    settings = resources.settings
    premium_limit = settings.premium_max_queued
    batch_limit = settings.batch_max_queued
    stale = list(
        await Generation.filter(
            tier=Tier.PREMIUM,
            status=Status.QUEUED,
            created_at__lt=now - timedelta(seconds=premium_limit),
        )
        .order_by("created_at")
        .limit(settings.reconcile_batch_limit)
    )
    stale += await (
        Generation.filter(
            tier=Tier.NORMAL,
            status=Status.QUEUED,
            queued_at__lt=now - timedelta(seconds=batch_limit),
        )
        .order_by("queued_at")
        .limit(settings.reconcile_batch_limit)
    )
    for unit in await _group(stale):
        try:
            await _expire_unit(resources, unit, now, report)
        except OUTAGE_ERRORS:
            raise
        except Exception:
            log.exception("giving up the queued job %s failed", unit.key)


async def _expire_unit(
    resources: JobsResources, unit: Unit, now: datetime, report: Report
) -> None:
    job_id = unit.job_id
    if job_id is not None and await job_is_running(resources.redis, job_id):
        return  # a node took it after all; its rows start any moment
    settings = resources.settings
    if unit.tier is Tier.PREMIUM:
        limit = settings.premium_max_queued
    else:
        limit = settings.batch_max_queued
    error = unavailable_error(unit.rows[0].model, limit)
    failed = await _fail_unit(resources, unit, error, now, statuses=(Status.QUEUED,))
    if job_id is not None and len(failed) == len(unit.rows):
        await drop_waiting_job(resources.redis, unit.queue, job_id)
    report.expired += len(failed)
    if failed:
        log.warning(
            "gave up %d queued generation(s) of job %s: no node took them",
            len(failed),
            unit.key,
        )


async def _expire_scheduled(
    resources: JobsResources, now: datetime, report: Report
) -> None:
    """Fail normal requests that no node has served since long after they were due."""
    settings = resources.settings
    limit = settings.scheduled_max_wait
    overdue = Q(
        status=Status.SCHEDULED, scheduled_for__lt=now - timedelta(seconds=limit)
    )
    ids = await (
        Generation.filter(overdue)
        .order_by("scheduled_for")
        .limit(settings.reconcile_batch_limit)
        .values_list("id", flat=True)
    )
    for generation_id in ids:
        try:
            # One at a time: a row the dispatcher holds is skipped, and one
            # that cannot be failed does not hold up the others.
            async with in_transaction():
                rows = await Generation.select_for_update(skip_locked=True).filter(
                    overdue, id=generation_id
                )
                if not rows:
                    continue  # dispatched or cancelled meanwhile
                failed = await fail_generations(
                    resources,
                    rows,
                    unavailable_error(rows[0].model, limit),
                    now,
                    statuses=(Status.SCHEDULED,),
                )
            for row in failed:
                await announce_done(resources.redis, row)
                log.warning(
                    "gave up scheduled generation %s: no node served %r",
                    row.id,
                    row.model,
                )
            report.expired += len(failed)
        except OUTAGE_ERRORS:
            raise
        except Exception:
            log.exception("giving up scheduled generation %s failed", generation_id)


async def reconcile(resources: JobsResources) -> Report:
    """One round: expire work nobody runs, then look at overdue queued/running rows."""
    now = utcnow()
    report = Report()
    await _expire_queued(resources, now, report)
    await _expire_scheduled(resources, now, report)
    for unit in await _units(resources, now):
        try:
            await _reconcile_unit(resources, unit, now, report)
        except OUTAGE_ERRORS:
            raise  # Redis or the database is down: the whole round waits
        except Exception:
            # One bad job must not keep the others stuck; it is tried again
            # next round (its traceback is in the log) and given up after
            # reconcile_max_failures rounds in a row.
            log.exception("reconciling job %s failed", unit.key)
            try:
                await _count_failure(resources, unit, now, report)
            except OUTAGE_ERRORS:
                raise
            except Exception:
                log.exception("giving up job %s failed", unit.key)
        else:
            await resources.redis.delete(RECONCILE_FAILURES_PREFIX + unit.key)
    if report.stored or report.requeued or report.failed or report.expired:
        log.info("reconciled: %s", report)
    return report

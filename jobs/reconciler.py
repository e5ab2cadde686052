"""The reconciler: queued or running work whose job is gone is put back or failed.

Postgres is the source of truth and Redis may lose anything (a worker killed,
Redis restarted empty), so every round looks at rows `queued` or `running`
past their deadline and asks Redis about the job each row derives from its
own columns: premium `generation_job_id(id, attempts)`, normal
`batch_job_id(batch_id, attempts)`.

- The job is alive (waiting or running): the deadline moves on; nothing else.
- The job is gone but the row's `store_result` job is alive: the same.
- The job is gone and `store_result` left a result in Redis without the row
  becoming final (it failed, or found the images missing): it runs again here
  with the same payload; stored rows are done.
- Otherwise the work is lost: it is enqueued again with attempts + 1, or,
  after `generation_max_attempts` enqueues, the row ends `failed` with a
  reason the user sees (and the failure email when delivery is email).

A lost normal row goes back on the queue in its old batch (same batch id,
next attempt) rather than back to `scheduled`: every unfinished row of a
batch keeps the batch's attempt, so the job id derived from any row (here,
and for the queue position `web` shows) is the batch's job id, and a row
never moves backwards from `queued` to `scheduled`. The node splits a batch
that outgrew a smaller node's max batch into several pipeline calls.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum

from arq.jobs import Job
from arq.worker import Retry
from redis.exceptions import RedisError
from tortoise.expressions import Q
from tortoise.transactions import in_transaction

from gpu_node.schemas import (
    RESULTS_QUEUE,
    TERMINAL_STATUSES,
    BatchJob,
    ErrorInfo,
    GenerationJob,
    GenerationResult,
    QueuedEvent,
    Status,
    Tier,
    batch_job_id,
    generation_job_id,
    premium_queue,
    result_job_id,
)
from jobs.dispatcher import generation_job, send_batch
from jobs.messages import generation_email
from jobs.results import (
    TRANSIENT_ERRORS,
    ResultRejected,
    announce_done,
    store_result,
)
from jobs.worker import RESOURCES, JobsResources
from sdapi.events import append_event
from sdapi.queue import (
    deserialize,
    enqueue_generation,
    job_is_live,
    queue_position,
)
from web.models import Delivery, Generation, utcnow
from web.outbox import queue_email

log = logging.getLogger(__name__)

IN_WORK = (Status.QUEUED, Status.RUNNING)
GAVE_UP_CODE = "attempts_exhausted"


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


def _overdue(now: datetime) -> Q:
    return Q(deadline__lt=now) | Q(deadline__isnull=True)


async def _units(res: JobsResources, now: datetime) -> list[Unit]:
    """Overdue queued/running rows, grouped by the job they share."""
    stuck = list(
        await Generation.filter(_overdue(now), status__in=IN_WORK)
        .order_by("deadline")
        .limit(res.settings.reconcile_batch_limit)
    )
    units: list[Unit] = []
    seen: set[tuple[uuid.UUID, int]] = set()
    for row in stuck:
        tier = Tier(row.tier)
        if tier is Tier.PREMIUM or row.batch_id is None:
            units.append(Unit(tier, row.attempts, (row,)))
            continue
        key = (row.batch_id, row.attempts)
        if key in seen:
            continue
        seen.add(key)
        # The whole batch shares the job, also rows not yet past their deadline.
        rows = await Generation.filter(
            batch_id=row.batch_id, attempts=row.attempts, status__in=IN_WORK
        ).order_by("created_at")
        units.append(Unit(tier, row.attempts, tuple(rows), row.batch_id))
    return units


async def _push_deadline(
    res: JobsResources, ids: list[uuid.UUID], attempt: int, now: datetime
) -> int:
    """Move the deadline of rows whose work is still alive."""
    updated: int = await Generation.filter(
        id__in=ids, status__in=IN_WORK, attempts=attempt
    ).update(deadline=now + timedelta(seconds=res.settings.queued_check_after))
    return updated


async def _recover(res: JobsResources, row: Generation) -> Recovery:
    """Finish `row` from its attempt's store_result job if one is alive or left."""
    job_id = result_job_id(row.id, row.attempts)
    if await job_is_live(res.redis, job_id):
        return Recovery.PENDING
    info = await Job(
        job_id, res.redis, _queue_name=RESULTS_QUEUE, _deserializer=deserialize
    ).result_info()
    if info is None or not info.args:
        return Recovery.LOST
    # The result key keeps the payload the node sent; storing is idempotent.
    try:
        outcome = await store_result({RESOURCES: res, "job_try": 1}, info.args[0])
    except Retry:
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


async def _fail(res: JobsResources, rows: list[Generation], now: datetime) -> None:
    """Mark locked `rows` failed and write their failure emails (in a transaction)."""
    settings = res.settings
    secret = settings.secret_key.get_secret_value() if settings.secret_key else ""
    for row in rows:
        error = ErrorInfo(code=GAVE_UP_CODE, message=gave_up_message(row.attempts))
        updated = await Generation.filter(
            id=row.id, status__in=IN_WORK, attempts=row.attempts
        ).update(
            status=Status.FAILED,
            error_code=error.code,
            error_message=error.message,
            finished_at=now,
            deadline=None,
        )
        if not updated:
            continue
        row.status = Status.FAILED
        row.error_code = error.code
        row.error_message = error.message
        if row.delivery is not Delivery.EMAIL:
            continue
        await row.fetch_related("user")
        message = generation_email(
            row,
            GenerationResult(
                generation_id=row.id,
                attempt=row.attempts,
                status=Status.FAILED,
                error=error,
                node_id="",
                model=row.model,
                finished_at=now,
            ),
            secret=secret,
            base_url=settings.public_url,
        )
        # The same dedupe key as store_result's: one email per generation.
        await queue_email(
            dedupe_key=f"generation:{row.id}",
            to_address=row.user.email,
            subject=message.subject,
            text_body=message.text,
            html_body=message.html,
            generation=row,
        )


async def _requeue(
    res: JobsResources, unit: Unit, rows: list[Generation], now: datetime
) -> GenerationJob | BatchJob:
    """Give locked `rows` their next attempt; the job to enqueue after commit."""
    attempt = unit.attempt + 1
    batch_id = unit.batch_id or uuid.uuid4()
    updated = await Generation.filter(
        id__in=[row.id for row in rows], status__in=IN_WORK, attempts=unit.attempt
    ).update(
        status=Status.QUEUED,
        attempts=attempt,
        batch_id=None if unit.tier is Tier.PREMIUM else batch_id,
        queued_at=now,
        started_at=None,
        deadline=now + timedelta(seconds=res.settings.queued_check_after),
    )
    if updated != len(rows):
        raise RuntimeError(f"locked rows of job {unit.job_id} changed under us")
    if unit.tier is Tier.PREMIUM:
        return generation_job(rows[0], attempt)
    return BatchJob(
        batch_id=batch_id,
        model=rows[0].model,
        items=[generation_job(row, attempt) for row in rows],
        attempt=attempt,
    )


async def _send(res: JobsResources, job: GenerationJob | BatchJob) -> None:
    """Enqueue a re-run after its commit (a failure waits for the next deadline)."""
    if isinstance(job, BatchJob):
        await send_batch(res, job)
        return
    try:
        await enqueue_generation(res.redis, job)
        position = await queue_position(
            res.redis,
            premium_queue(job.model),
            generation_job_id(job.generation_id, job.attempt),
        )
        await append_event(
            res.redis, job.generation_id, QueuedEvent(position=position or 0)
        )
    except (RedisError, OSError):
        log.warning("re-enqueue of %s failed; retrying later", job.generation_id)


async def _retry_or_fail(
    res: JobsResources, unit: Unit, lost: list[uuid.UUID], now: datetime, report: Report
) -> None:
    """Re-enqueue lost rows of `unit`, or fail them once out of attempts."""
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
        if unit.attempt >= res.settings.generation_max_attempts:
            await _fail(res, rows, now)
            job: GenerationJob | BatchJob | None = None
        else:
            job = await _requeue(res, unit, rows, now)
    if job is None:
        for row in rows:
            if row.status is Status.FAILED:
                await announce_done(res.redis, row)
                report.failed += 1
        log.warning(
            "gave up %d generation(s) of job %s after %d attempts",
            len(rows),
            unit.job_id,
            unit.attempt,
        )
        return
    log.info("re-enqueued job %s as attempt %d", unit.job_id, unit.attempt + 1)
    await _send(res, job)
    report.requeued += len(rows)


async def _reconcile_unit(
    res: JobsResources, unit: Unit, now: datetime, report: Report
) -> None:
    ids = [row.id for row in unit.rows]
    job_id = unit.job_id
    if job_id is not None and await job_is_live(res.redis, job_id):
        report.alive += await _push_deadline(res, ids, unit.attempt, now)
        return
    lost: list[uuid.UUID] = []
    for row in unit.rows:
        found = await _recover(res, row)
        if found is Recovery.PENDING:
            report.alive += await _push_deadline(res, [row.id], unit.attempt, now)
        elif found is Recovery.STORED:
            report.stored += 1
        else:
            lost.append(row.id)
    if lost:
        await _retry_or_fail(res, unit, lost, now, report)


async def reconcile(res: JobsResources) -> Report:
    """One round over overdue queued/running generations."""
    now = utcnow()
    report = Report()
    for unit in await _units(res, now):
        try:
            await _reconcile_unit(res, unit, now, report)
        except (*TRANSIENT_ERRORS, RedisError):
            raise  # Redis or the database is down: the whole round waits
        except Exception:
            # One bad row must not keep the others stuck; it is tried again
            # next round, and its traceback is in the log.
            log.exception("reconciling job %s failed", unit.job_id)
    if report.stored or report.requeued or report.failed:
        log.info("reconciled: %s", report)
    return report

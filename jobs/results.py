"""Persisting what GPU nodes report: starts and finished generations.

arq delivers at least once, so both jobs are idempotent: status only moves
forward (`WHERE status NOT IN terminal`), images are keyed by (generation,
index), the email by a dedupe key, and the one `done` event by a Redis NX key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tortoise.exceptions import (
    DBConnectionError,
    OperationalError,
    TransactionManagementError,
)
from tortoise.transactions import in_transaction

from jobs.resources import WEBHOOKS_TASK, JobsResources, resources_of
from jobs.result_emails import queue_generation_email
from sdapi.contract.names import IMAGE_TTL_S, image_key, progress_key
from sdapi.contract.payloads import ErrorInfo, GenerationResult, StartedNotice
from sdapi.contract.status import TERMINAL_STATUSES, Status
from sdapi.contract.webhooks import WebhookEvent
from sdapi.db.connection import table_name
from sdapi.db.image_store import StoredObject
from sdapi.db.models import GeneratedImage, Generation, utcnow
from sdapi.db.webhooks import queue_webhook_event
from sdapi.infra.object_store import StoreUnavailable, result_object_key
from sdapi.infra.queue import retry_after
from sdapi.infra.streams import append_done

log = logging.getLogger(__name__)

# Tries of a `store_result` job: with the 60 s cap of `retry_after`, about half
# an hour of a database or Redis outage. After the last one arq keeps the job's
# payload as its result (keep_result, jobs.worker) for the reconciler to store.
STORE_RESULT_MAX_TRIES = 30
MARK_STARTED_MAX_TRIES = 10


class ResultRejected(ValueError):
    """A payload that can never be stored; retrying would not help."""


# Errors of a database or Redis that is restarting or unreachable; arq retries
# only `Retry`. Tortoise passes asyncpg's connection errors through: a backend
# terminated mid-query (ConnectionDoesNotExistError), a connection found
# closed, or inside a transaction (InterfaceError), a server shutting down or
# starting up (AdminShutdownError, CannotConnectNowError, ...).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    OperationalError,
    DBConnectionError,
    TransactionManagementError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    RedisConnectionError,
    RedisTimeoutError,
    # The image store (SDAPI_STORAGE_URL) down or stalled: the result waits in
    # Redis (`_keep_pngs`) and is stored once the store answers again.
    StoreUnavailable,
)


async def mark_started(ctx: dict[str, Any], payload: dict[str, Any]) -> str:
    """Record that a node began a generation (queued -> running)."""
    try:
        notice = StartedNotice.model_validate(payload)
    except ValidationError as exc:
        raise ResultRejected(f"malformed mark_started payload: {exc}") from None
    resources = resources_of(ctx)
    check_after = timedelta(seconds=resources.settings.queued_check_after)
    try:
        async with in_transaction():
            updated = await Generation.filter(
                id=notice.generation_id, status=Status.QUEUED
            ).update(
                status=Status.RUNNING,
                started_at=notice.started_at,
                deadline=utcnow() + check_after,
            )
            queued = False
            if updated:
                queued = await queue_webhook_event(
                    await Generation.get(id=notice.generation_id),
                    WebhookEvent.STARTED,
                    resources.links(),
                )
    except TRANSIENT_ERRORS:
        log.warning("recording the start of %s failed; retrying", notice.generation_id)
        raise retry_after(ctx) from None
    if queued:
        resources.wake(WEBHOOKS_TASK)
    return "running" if updated else "unchanged"


async def _load_pngs(redis: Redis, result: GenerationResult) -> list[bytes] | None:
    """The result's PNGs from Redis, checked against their hashes; None if lost."""
    if not result.images:
        return []
    keys = [image_key(result.generation_id, image.index) for image in result.images]
    values = await redis.mget(keys)
    pngs: list[bytes] = []
    for image, data in zip(result.images, values, strict=True):
        if data is None:
            return None
        if hashlib.sha256(data).hexdigest() != image.sha256:
            raise ResultRejected(f"image {image.index} does not match its sha256")
        pngs.append(data)
    return pngs


def parse_result(payload: Any) -> GenerationResult:
    """The result a `store_result` payload carries; ResultRejected if malformed."""
    try:
        return GenerationResult.model_validate(payload)
    except ValidationError as exc:
        raise ResultRejected(f"malformed store_result payload: {exc}") from None


async def store_result(ctx: dict[str, Any], payload: dict[str, Any]) -> str:
    """The `store_result` task: `store`, retried while a dependency is down."""
    result = parse_result(payload)
    try:
        return await save_result(resources_of(ctx), result)
    except TRANSIENT_ERRORS:
        log.warning("storing %s failed; retrying", result.generation_id, exc_info=True)
        raise retry_after(ctx) from None


async def save_result(resources: JobsResources, result: GenerationResult) -> str:
    """Store a finished generation once, email it if asked, then announce `done`.

    Raises one of TRANSIENT_ERRORS while the database, Redis or the image store
    is down.
    """
    pngs = await _load_pngs(resources.redis, result)
    if pngs is None:
        # Redis lost the images: leave the row for the reconciler to run again.
        log.warning("images of %s are gone from Redis", result.generation_id)
        return "images missing"
    current = (
        await Generation.filter(id=result.generation_id).only("id", "status").first()
    )
    stored: list[StoredObject] = []
    if current is not None and current.status not in TERMINAL_STATUSES:
        # Written before the transaction (never under the row lock), so the
        # row is marked succeeded only once its images are in the store.
        stored = await _write_pngs(resources, result, pngs)

    async with in_transaction():
        # Lock the generation row only: Tortoise joins the user with an outer
        # join, which Postgres refuses to lock.
        generation = (
            await Generation.select_for_update(of=(table_name(Generation),))
            .select_related("user")
            .get_or_none(id=result.generation_id)
        )
        if generation is None:
            return "unknown generation"
        webhooks = False
        # Statuses only move forward: a row final at the check above is final
        # here, and one that was not has all its images written.
        if generation.status in TERMINAL_STATUSES or (
            result.status is Status.SUCCEEDED and len(stored) != len(pngs)
        ):
            outcome = "already final"
        else:
            await _persist(generation, result, stored)
            await queue_generation_email(resources, generation, result)
            webhooks = await _queue_result_webhooks(resources, generation, result)
            outcome = str(result.status)

    if webhooks:
        resources.wake(WEBHOOKS_TASK)
    await announce_done(resources.redis, generation)
    return outcome


async def _write_pngs(
    resources: JobsResources, result: GenerationResult, pngs: list[bytes]
) -> list[StoredObject]:
    """Write a succeeded result's PNGs to the image store (none for a failure).

    While the store is down the node's copies in Redis must outlive the
    retries (and the reconciler's), so each failure gives them a full TTL again.
    """
    if result.status is not Status.SUCCEEDED:
        return []
    writes = (
        resources.stores.write(result_object_key(result.generation_id, i.index), png)
        for i, png in zip(result.images, pngs, strict=True)
    )
    try:
        # Together: a batch's images cost one store round trip, not one each.
        return list(await asyncio.gather(*writes))
    except StoreUnavailable:
        await _keep_pngs(resources.redis, result)
        raise


async def _keep_pngs(redis: Redis, result: GenerationResult) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for image in result.images:
            pipe.expire(image_key(result.generation_id, image.index), IMAGE_TTL_S)
        await pipe.execute()


async def _queue_result_webhooks(
    resources: JobsResources, generation: Generation, result: GenerationResult
) -> bool:
    """The `image` events of a stored result, then `completed` (inside the
    transaction that stores it); True if the webhook asked for any."""
    links = resources.links()
    queued = False
    for image in result.images if result.status is Status.SUCCEEDED else []:
        queued |= await queue_webhook_event(
            generation, WebhookEvent.IMAGE, links, image_index=image.index
        )
    queued |= await queue_webhook_event(generation, WebhookEvent.COMPLETED, links)
    return queued


async def announce_done(redis: Redis, generation: Generation) -> None:
    """Append the one `done` event of a finished generation; drop its progress."""
    done = generation.done_event()
    if done is None:
        return
    await append_done(redis, generation.id, done)
    await redis.delete(progress_key(generation.id))


async def fail_generations(
    resources: JobsResources,
    rows: Iterable[Generation],
    error: ErrorInfo | Callable[[Generation], ErrorInfo],
    now: datetime,
    *,
    statuses: Iterable[Status],
) -> list[Generation]:
    """End locked `rows` `failed` with `error`, and write their failure emails.

    Call it inside the caller's transaction (their `completed` webhook events
    are written in it too); a row no longer in `statuses` or on another
    attempt is left alone. Returns the rows it failed: announce
    their `done` (announce_done) after the commit.
    """
    allowed = list(statuses)
    failed: list[Generation] = []
    for row in rows:
        info = error(row) if callable(error) else error
        updated = await Generation.filter(
            id=row.id, status__in=allowed, attempts=row.attempts
        ).update(
            status=Status.FAILED,
            error_code=info.code,
            error_message=info.message,
            finished_at=now,
            deadline=None,
        )
        if not updated:
            continue
        row.status = Status.FAILED
        row.error_code = info.code
        row.error_message = info.message
        row.finished_at = now
        row.deadline = None
        await queue_generation_email(resources, row, info)
        await queue_webhook_event(row, WebhookEvent.COMPLETED, resources.links())
        failed.append(row)
    return failed


async def _persist(
    generation: Generation, result: GenerationResult, stored: list[StoredObject]
) -> None:
    """Write the images and the terminal status (inside the caller's transaction)."""
    now = utcnow()
    if result.status is Status.SUCCEEDED:
        await GeneratedImage.bulk_create(
            [
                GeneratedImage(
                    generation=generation,
                    index=image.index,
                    seed=image.seed,
                    width=image.width,
                    height=image.height,
                    sha256=image.sha256,
                    store=obj.store,
                    object_key=obj.object_key,
                    size=obj.size,
                )
                for image, obj in zip(result.images, stored, strict=True)
            ],
            ignore_conflicts=True,
        )
    generation.status = result.status
    generation.started_at = generation.started_at or result.started_at or now
    generation.finished_at = result.finished_at
    generation.deadline = None
    if result.error is not None:
        generation.error_code = result.error.code
        generation.error_message = result.error.message
    await generation.save(
        update_fields=[
            "status",
            "started_at",
            "finished_at",
            "deadline",
            "error_code",
            "error_message",
        ]
    )

"""The outbox sender: claims due emails, sends them over SMTP, records the outcome.

Any number of senders can run (claims use `SKIP LOCKED`); what each kind of
failure costs is in docs/ARCHITECTURE.md ("Outbox sender").
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

from tortoise.expressions import F
from tortoise.transactions import in_transaction

from jobs.outbox_claims import claim_due as claim_due_rows
from jobs.outbox_claims import database_now, still_ours
from jobs.resources import JobsResources, SmtpBackoff
from jobs.results import TRANSIENT_ERRORS
from jobs.settings import JobsSettings
from jobs.smtp import SendFailed, SmtpConnection, Trouble, compose
from sdapi.db.models import Generation, OutboxEmail, OutboxStatus
from sdapi.infra.backoff import backoff_s
from sdapi.infra.object_store import StoreUnavailable

log = logging.getLogger(__name__)

# Rows one claim takes; a round claims again while batches come back full.
BATCH_SIZE = 20
# Longest last_error kept (characters).
ERROR_LIMIT = 1000
# Jitter takes up to this fraction off a backoff delay, so retries of many
# emails that failed together spread out.
JITTER = 0.1


class ServerDown(Exception):
    """The SMTP server cannot take mail now; the round ends."""


async def claim_due(settings: JobsSettings) -> list[OutboxEmail]:
    """Take up to BATCH_SIZE due emails for this sender and mark them `sending`."""
    return await claim_due_rows(
        OutboxEmail,
        limit=BATCH_SIZE,
        stuck_after_s=settings.outbox_stuck_after,
        last_try=lambda row, _now: row.attempts >= settings.outbox_max_attempts,
    )


def _too_old(row: OutboxEmail, settings: JobsSettings) -> bool:
    """Whether the email was written longer ago than the outbox keeps trying."""
    age = (row.claimed_at or row.created_at) - row.created_at
    return age.total_seconds() >= settings.outbox_give_up_after


async def mark_sent(row: OutboxEmail) -> None:
    """Record delivery, and `emailed_at` of the generation the email is about."""
    async with in_transaction():
        now = await database_now()
        updated = await OutboxEmail.filter(still_ours(row)).update(
            status=OutboxStatus.SENT, sent_at=now
        )
        generation_id = row.generation_id  # type: ignore[attr-defined]
        if updated and generation_id is not None:
            await Generation.filter(id=generation_id, emailed_at=None).update(
                emailed_at=now
            )
    if not updated:
        log.warning("email %s was sent but its claim had moved on", row.id)


async def _give_up(
    row: OutboxEmail, error: str, *, counted: bool = True
) -> OutboxStatus:
    """End a claimed row `failed`; `counted` False: its claim was no attempt."""
    if not counted:
        row.attempts -= 1
    await OutboxEmail.filter(still_ours(row)).update(
        status=OutboxStatus.FAILED,
        last_error=error[:ERROR_LIMIT],
        claimed_at=None,
        attempts=row.attempts,
    )
    log.error(
        "email %s to %s failed for good after %d attempt(s): %s",
        row.id,
        row.to_address,
        row.attempts,
        error,
    )
    return OutboxStatus.FAILED


async def mark_failed_attempt(
    row: OutboxEmail,
    error: str,
    *,
    settings: JobsSettings,
    trouble: Trouble | None = None,
) -> OutboxStatus:
    """Record a failed attempt at one message: `pending` with backoff, or `failed`.

    `trouble` None: not the server's doing (a bug, bad data), limited by
    `outbox_max_attempts`; TEMPORARY: limited by the email's age.
    """
    error = error[:ERROR_LIMIT]
    if trouble is Trouble.PERMANENT:
        return await _give_up(row, error)
    if trouble is Trouble.TEMPORARY and _too_old(row, settings):
        return await _give_up(row, error)
    if trouble is None and row.attempts >= settings.outbox_max_attempts:
        return await _give_up(row, error)
    delay = backoff_s(
        row.attempts,
        base=settings.outbox_backoff_base,
        cap=settings.outbox_backoff_max,
        jitter=JITTER,
    )
    await OutboxEmail.filter(still_ours(row)).update(
        status=OutboxStatus.PENDING,
        last_error=error,
        claimed_at=None,
        next_attempt_at=(row.claimed_at or await database_now())
        + timedelta(seconds=delay),
    )
    log.warning(
        "email %s: attempt %d failed (%s); retrying in %.1fs",
        row.id,
        row.attempts,
        error,
        delay,
    )
    return OutboxStatus.PENDING


async def release(rows: list[OutboxEmail], error: str | None = None) -> None:
    """Hand claimed rows back untried (their attempt is not counted).

    With `error` (the server was down), it is recorded as their last error.
    """
    for row in rows:
        changes: dict[str, object] = {
            "status": OutboxStatus.PENDING,
            "claimed_at": None,
            "attempts": F("attempts") - 1,
        }
        if error is not None:
            changes["last_error"] = error[:ERROR_LIMIT]
        await OutboxEmail.filter(still_ours(row)).update(**changes)


async def _server_down(
    rows: list[OutboxEmail], error: str, settings: JobsSettings, state: SmtpBackoff
) -> None:
    """The server failed us: wait longer before trying it, hand the rows back."""
    state.failures += 1
    delay = backoff_s(
        state.failures,
        base=settings.outbox_backoff_base,
        cap=settings.smtp_retry_max,
        jitter=JITTER,
    )
    state.retry_at = time.monotonic() + delay
    expired = [row for row in rows if _too_old(row, settings)]
    waiting = [row for row in rows if row not in expired]
    for row in expired:
        await _give_up(
            row,
            f"the SMTP server was unavailable for too long: {error}",
            counted=False,
        )
    await release(waiting, error=error)
    log.warning(
        "SMTP server unavailable (%s); %d claimed email(s) wait, trying again in %.1fs",
        error,
        len(waiting),
        delay,
    )


async def _deliver(
    row: OutboxEmail, connection: SmtpConnection, resources: JobsResources
) -> None:
    """Send one claimed row and record the outcome; ServerDown if the server
    failed, StoreUnavailable if its images cannot be read now."""
    settings = resources.settings
    try:
        async with asyncio.timeout(settings.outbox_send_timeout):
            mail = await compose(
                row, mail_from=settings.mail_from, stores=resources.stores
            )
            await connection.send(mail)
    except SendFailed as failure:
        if failure.trouble is Trouble.SERVER:
            raise ServerDown(str(failure)) from failure
        await mark_failed_attempt(
            row, str(failure), settings=settings, trouble=failure.trouble
        )
        return
    except TimeoutError:
        # The state of the conversation is unknown: start the next one afresh.
        connection.abort()
        raise ServerDown(
            f"no delivery within {settings.outbox_send_timeout:g}s"
        ) from None
    except TRANSIENT_ERRORS:
        raise  # the database: the round ends; the row is taken over later
    except Exception as exc:
        # A bug or bad data: keep the traceback, still count the attempt so
        # the row ends `failed` instead of being retried forever.
        log.exception("email %s could not be built or sent", row.id)
        await mark_failed_attempt(
            row, f"{type(exc).__name__}: {exc}", settings=settings
        )
        return
    await mark_sent(row)
    log.info("sent email %s to %s", mail.message_id, row.to_address)


async def send_round(resources: JobsResources) -> int:
    """Claim and send due emails until none are left; returns how many were tried."""
    settings = resources.settings
    smtp = settings.smtp
    if smtp is None:
        waiting = await OutboxEmail.filter(status=OutboxStatus.PENDING).count()
        if waiting:
            log.warning(
                "SDAPI_SMTP_URL is not set: %d email(s) wait to be sent", waiting
            )
        return 0
    state = resources.smtp_backoff
    if time.monotonic() < state.retry_at:
        return 0  # the server was down a moment ago
    tried = 0
    async with SmtpConnection(smtp, timeout=settings.smtp_timeout) as connection:
        while True:
            rows = await claim_due(settings)
            # Rows not started well before they count as stuck go back, so
            # another sender never takes over a claim this one still works on.
            deadline = time.monotonic() + settings.outbox_stuck_after / 2
            for index, row in enumerate(rows):
                if time.monotonic() > deadline:
                    await release(rows[index:])
                    return tried
                try:
                    await _deliver(row, connection, resources)
                except ServerDown as down:
                    await _server_down(rows[index:], str(down), settings, state)
                    return tried
                except StoreUnavailable as exc:
                    # Not the mail's fault: no attempt counted, the next round
                    # tries again.
                    log.warning("images for email %s unreadable: %s", row.id, exc)
                    await release(rows[index:], f"image store: {exc}")
                    return tried
                state.failures = 0  # the server answered
                tried += 1
            if len(rows) < BATCH_SIZE:
                return tried


async def send_due_emails(resources: JobsResources) -> None:
    """Periodic task of the jobs worker: send whatever the outbox has due."""
    await send_round(resources)

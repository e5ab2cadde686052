"""The outbox sender: claims due emails, sends them over SMTP, records the outcome.

Claiming is a short transaction (`SELECT ... FOR UPDATE SKIP LOCKED`, then the
rows are marked `sending`), so any number of senders can run and each row goes
to exactly one. Sending happens outside any transaction; the outcome is then
written conditionally on the claim still being ours. A sender that dies
mid-send leaves its rows `sending`; after `outbox_stuck_after` another sender
claims them again (the one case where a message may go out twice, which its
stable Message-ID lets the receiver recognise).
"""

from __future__ import annotations

import logging
import random
import time
from datetime import datetime, timedelta

import aiosmtplib
from tortoise.expressions import F, Q
from tortoise.transactions import in_transaction

from jobs.mailer import SmtpConnection, compose, is_permanent
from jobs.settings import JobsSettings
from jobs.worker import JobsResources
from web.models import Generation, OutboxEmail, OutboxStatus, utcnow

log = logging.getLogger(__name__)

# Rows one claim takes; a round claims again while batches come back full.
BATCH_SIZE = 20
# Longest last_error kept (characters).
ERROR_LIMIT = 1000
# Jitter takes up to this fraction off a backoff delay, so retries of many
# emails that failed together spread out.
JITTER = 0.1


def backoff_delay(
    attempts: int, *, base: float, cap: float, jitter: float = JITTER
) -> float:
    """Seconds before the next try after `attempts` failed ones (1, 2, ...)."""
    exponent = min(max(attempts - 1, 0), 60)
    delay = min(cap, base * 2.0**exponent)
    # Not security-relevant randomness: it only spreads retries out.
    return delay * (1.0 - random.uniform(0.0, jitter))  # noqa: S311


async def claim_due(settings: JobsSettings, now: datetime) -> list[OutboxEmail]:
    """Take up to BATCH_SIZE due rows for this sender and mark them `sending`."""
    stuck_before = now - timedelta(seconds=settings.outbox_stuck_after)
    async with in_transaction():
        rows = (
            await OutboxEmail.select_for_update(skip_locked=True)
            .filter(
                Q(status=OutboxStatus.PENDING, next_attempt_at__lte=now)
                | Q(status=OutboxStatus.SENDING, claimed_at__lt=stuck_before)
            )
            .order_by("next_attempt_at", "created_at")
            .limit(BATCH_SIZE)
        )
        if not rows:
            return []
        await OutboxEmail.filter(id__in=[row.id for row in rows]).update(
            status=OutboxStatus.SENDING, claimed_at=now, attempts=F("attempts") + 1
        )
    for row in rows:
        if row.status is OutboxStatus.SENDING:
            log.warning("email %s was stuck while sending; retrying it", row.id)
        row.status = OutboxStatus.SENDING
        row.claimed_at = now
        row.attempts += 1
    return rows


def _ours(row: OutboxEmail) -> Q:
    """Rows still claimed by this sender (a stuck-claim takeover changes claimed_at)."""
    return Q(id=row.id, status=OutboxStatus.SENDING, claimed_at=row.claimed_at)


async def mark_sent(row: OutboxEmail, now: datetime) -> None:
    """Record delivery, and `emailed_at` of the generation the email is about."""
    async with in_transaction():
        updated = await OutboxEmail.filter(_ours(row)).update(
            status=OutboxStatus.SENT, sent_at=now
        )
        generation_id = row.generation_id  # type: ignore[attr-defined]
        if updated and generation_id is not None:
            await Generation.filter(id=generation_id, emailed_at=None).update(
                emailed_at=now
            )
    if not updated:
        log.warning("email %s was sent but its claim had moved on", row.id)


async def mark_failed_attempt(
    row: OutboxEmail,
    error: str,
    *,
    settings: JobsSettings,
    now: datetime,
    permanent: bool = False,
) -> OutboxStatus:
    """Record a failed attempt: back to `pending` with backoff, or `failed`."""
    error = error[:ERROR_LIMIT]
    if permanent or row.attempts >= settings.outbox_max_attempts:
        await OutboxEmail.filter(_ours(row)).update(
            status=OutboxStatus.FAILED, last_error=error, claimed_at=None
        )
        log.error(
            "email %s to %s failed for good after %d attempt(s): %s",
            row.id,
            row.to_address,
            row.attempts,
            error,
        )
        return OutboxStatus.FAILED
    delay = backoff_delay(
        row.attempts,
        base=settings.outbox_backoff_base,
        cap=settings.outbox_backoff_max,
    )
    await OutboxEmail.filter(_ours(row)).update(
        status=OutboxStatus.PENDING,
        last_error=error,
        claimed_at=None,
        next_attempt_at=now + timedelta(seconds=delay),
    )
    log.warning(
        "email %s: attempt %d failed (%s); retrying in %.1fs",
        row.id,
        row.attempts,
        error,
        delay,
    )
    return OutboxStatus.PENDING


async def release(rows: list[OutboxEmail]) -> None:
    """Hand claimed rows back untried (their attempt is not counted)."""
    for row in rows:
        await OutboxEmail.filter(_ours(row)).update(
            status=OutboxStatus.PENDING, claimed_at=None, attempts=F("attempts") - 1
        )


async def _deliver(
    row: OutboxEmail, connection: SmtpConnection, settings: JobsSettings
) -> None:
    if row.attempts > settings.outbox_max_attempts:
        # Only a stuck row gets here: its sender died on the last attempt.
        await mark_failed_attempt(
            row,
            "the sender stopped while sending the last attempt",
            settings=settings,
            now=utcnow(),
            permanent=True,
        )
        return
    try:
        mail = await compose(row, mail_from=settings.mail_from)
        await connection.send(mail)
    except (aiosmtplib.SMTPException, OSError) as exc:
        # The server is down, slow or refusing: expected, retried with backoff.
        await mark_failed_attempt(
            row,
            f"{type(exc).__name__}: {exc}",
            settings=settings,
            now=utcnow(),
            permanent=is_permanent(exc),
        )
        return
    except Exception as exc:
        # A bug or bad data: keep the traceback, still count the attempt so
        # the row ends `failed` instead of being retried forever.
        log.exception("email %s could not be built or sent", row.id)
        await mark_failed_attempt(
            row, f"{type(exc).__name__}: {exc}", settings=settings, now=utcnow()
        )
        return
    await mark_sent(row, utcnow())
    log.info("sent email %s to %s", mail.message_id, row.to_address)


async def send_round(settings: JobsSettings) -> int:
    """Claim and send due emails until none are left; returns how many were tried."""
    smtp = settings.smtp
    if smtp is None:
        waiting = await OutboxEmail.filter(status=OutboxStatus.PENDING).count()
        if waiting:
            log.warning(
                "SDAPI_SMTP_URL is not set: %d email(s) wait to be sent", waiting
            )
        return 0
    tried = 0
    async with SmtpConnection(smtp, timeout=settings.smtp_timeout) as connection:
        while True:
            rows = await claim_due(settings, utcnow())
            # Rows not started well before they count as stuck go back, so
            # another sender never takes over a claim this one still works on.
            deadline = time.monotonic() + settings.outbox_stuck_after / 2
            for index, row in enumerate(rows):
                if time.monotonic() > deadline:
                    await release(rows[index:])
                    return tried
                await _deliver(row, connection, settings)
                tried += 1
            if len(rows) < BATCH_SIZE:
                return tried


async def send_due_emails(res: JobsResources) -> None:
    """Periodic task of the jobs worker: send whatever the outbox has due."""
    await send_round(res.settings)

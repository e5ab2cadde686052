"""Claims on the outbox tables (emails, webhook deliveries), one way for both.

A sender claims due rows, and rows another sender left `sending` longer than
`stuck_after_s` (it died mid-send), with `SKIP LOCKED`, so any number of
senders can run. A row a sender died on while sending it for the last time
it may be tried (one that crashes its sender, say) is failed instead of
being taken over again forever.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TypeVar

from tortoise.expressions import F, Q
from tortoise.transactions import in_transaction

from sdapi.db.connection import model_connection
from sdapi.db.models import OutboxEmail, OutboxStatus, WebhookDelivery

log = logging.getLogger(__name__)

# The outbox tables; they share the columns a claim reads and writes.
Row = TypeVar("Row", OutboxEmail, WebhookDelivery)

DIED_ON_LAST_TRY = "the sender stopped while sending it, on the last attempt"


async def database_now() -> datetime:
    """The database's clock (the one every sender's claims are compared on),
    read when called, also inside a transaction (unlike now())."""
    rows = await model_connection(OutboxEmail).execute_query_dict(
        "SELECT clock_timestamp() AS now"
    )
    now: datetime = rows[0]["now"]
    return now


async def claim_due(
    table: type[Row],
    *,
    limit: int,
    stuck_after_s: float,
    last_try: Callable[[Row, datetime], bool],
) -> list[Row]:
    """Take up to `limit` due rows of `table` and mark them `sending`, their
    attempt counted; `last_try(row, now)` says whether a row left `sending`
    was on its last attempt. Each claimed row's `claimed_at` is the
    database's time of the claim."""
    what = "email" if table is OutboxEmail else "webhook"
    async with in_transaction():
        now = await database_now()
        stuck_before = now - timedelta(seconds=stuck_after_s)
        rows = (
            await table.select_for_update(skip_locked=True)
            .filter(
                Q(status=OutboxStatus.PENDING, next_attempt_at__lte=now)
                | Q(status=OutboxStatus.SENDING, claimed_at__lt=stuck_before)
            )
            .order_by("next_attempt_at", "created_at")
            .limit(limit)
        )
        dead = [
            row
            for row in rows
            if row.status is OutboxStatus.SENDING and last_try(row, now)
        ]
        if dead:
            await table.filter(id__in=[row.id for row in dead]).update(
                status=OutboxStatus.FAILED, claimed_at=None, last_error=DIED_ON_LAST_TRY
            )
            for row in dead:
                log.error("%s %s failed for good: its sender kept dying", what, row.id)
            rows = [row for row in rows if row not in dead]
        if not rows:
            return []
        await table.filter(id__in=[row.id for row in rows]).update(
            status=OutboxStatus.SENDING, claimed_at=now, attempts=F("attempts") + 1
        )
    for row in rows:
        if row.status is OutboxStatus.SENDING:
            log.warning("%s %s was stuck while sending; retrying it", what, row.id)
        row.status = OutboxStatus.SENDING
        row.claimed_at = now
        row.attempts += 1
    return rows


def still_ours(row: OutboxEmail | WebhookDelivery) -> Q:
    """The row while still claimed by this sender (a takeover moves claimed_at)."""
    return Q(id=row.id, status=OutboxStatus.SENDING, claimed_at=row.claimed_at)

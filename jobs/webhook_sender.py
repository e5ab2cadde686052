"""The webhook sender: claims due deliveries, POSTs them signed, records the outcome.

Any number of senders can run (claims use `SKIP LOCKED`). A delivery is
claimed (`sending`, its attempt counted) before it is POSTed, and marked
`sent` only after a 2xx within the deadline: a sender killed in between
leaves it `sending`, and another takes it over after `webhook_stuck_after`,
with the same `webhook-id` (jobs/outbox_claims.py, shared with the email
sender). So an event is delivered at least once, and twice only when a
receiver's 2xx came too late (past the deadline, or while the sender died).
A delivery whose sender dies on it past `webhook_give_up_after` fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta

import aiohttp

from jobs.outbox_claims import claim_due as claim_due_rows
from jobs.outbox_claims import database_now, still_ours
from jobs.resources import WEBHOOKS_TASK as WEBHOOKS_TASK
from jobs.resources import JobsResources
from jobs.settings import JobsSettings
from sdapi.contract.webhooks import ANSWER_READ_BYTES
from sdapi.db.models import Generation, OutboxStatus, WebhookDelivery, utcnow
from sdapi.db.webhooks import ERROR_LIMIT, account_secrets, message_id, sign
from sdapi.infra.backoff import backoff_s
from sdapi.infra.webhook_targets import (
    CheckedResolver,
    TargetRefused,
    address_refusal,
    parse_target,
)

log = logging.getLogger(__name__)

# Rows one claim takes; a round claims again while batches come back full.
BATCH_SIZE = 50
# Jitter takes up to this fraction off a backoff delay.
JITTER = 0.1
USER_AGENT = "sdapi-webhooks/1"


class Refused(Exception):
    """A delivery that can never be made (its target is not allowed)."""


async def claim_due(settings: JobsSettings) -> list[WebhookDelivery]:
    """Take up to BATCH_SIZE due deliveries (and stuck ones) and mark them
    `sending`; one a sender died on past the give-up time fails."""
    give_up = timedelta(seconds=settings.webhook_give_up_after)
    return await claim_due_rows(
        WebhookDelivery,
        limit=BATCH_SIZE,
        stuck_after_s=settings.webhook_stuck_after,
        last_try=lambda row, now: now - row.created_at >= give_up,
    )


async def _signing_secrets(
    rows: list[WebhookDelivery], settings: JobsSettings
) -> dict[uuid.UUID, list[str]]:
    """The secrets that sign each row now, by generation id."""
    generation_ids = {row.generation_id for row in rows}  # type: ignore[attr-defined]
    owners = dict(
        await Generation.filter(id__in=list(generation_ids)).values_list(
            "id", "user_id"
        )
    )
    # The process's clock, as rotations are stamped with (sdapi.db.webhooks).
    now = utcnow()
    by_user: dict[uuid.UUID, list[str]] = {}
    for user_id in set(owners.values()):
        found = await account_secrets(user_id, settings.secret())
        by_user[user_id] = found.signing(now)
    return {generation: by_user[user] for generation, user in owners.items()}


def _check_literal(url: str, settings: JobsSettings) -> None:
    """Refuse a URL whose host is a non-public IP address (no resolver sees it)."""
    target = parse_target(url)
    if target.literal is not None and not settings.webhook_allow_private:
        reason = address_refusal(target.literal)
        if reason is not None:
            raise TargetRefused(f"{target.host} is not a public address: {reason}.")


async def post(
    session: aiohttp.ClientSession,
    row: WebhookDelivery,
    secrets: list[str],
    settings: JobsSettings,
) -> str | None:
    """POST one delivery; None when the receiver took it, else why not.

    Raises Refused for a target that is not allowed (nothing is sent).
    """
    try:
        _check_literal(row.url, settings)
    except TargetRefused as refused:
        raise Refused(str(refused)) from None
    ident = message_id(row.id)
    timestamp = int(time.time())
    body = row.body.encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": ident,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(
            sign(secret, ident, timestamp, body) for secret in secrets
        ),
    }
    try:
        async with asyncio.timeout(settings.webhook_timeout):
            async with session.post(
                row.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                answer = await response.content.read(ANSWER_READ_BYTES)
    except TargetRefused as refused:
        raise Refused(str(refused)) from None
    except TimeoutError:
        return f"no answer within {settings.webhook_timeout:g}s"
    except (aiohttp.ClientError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if 200 <= response.status < 300:
        return None
    text = answer.decode("utf-8", "replace").strip()[:200]
    moved = " (redirects are not followed)" if 300 <= response.status < 400 else ""
    return f"HTTP {response.status}{moved}" + (f": {text}" if text else "")


async def _record(
    row: WebhookDelivery, error: str | None, settings: JobsSettings, *, final: bool
) -> None:
    """Record an attempt: `sent`, `pending` again with backoff, or `failed`."""
    now = await database_now()
    if error is None:
        updated = await WebhookDelivery.filter(still_ours(row)).update(
            status=OutboxStatus.SENT, delivered_at=now, claimed_at=None
        )
        if not updated:
            log.warning("webhook %s was delivered but its claim had moved on", row.id)
        return
    error = error[:ERROR_LIMIT]
    age = (now - row.created_at).total_seconds()
    if final or age >= settings.webhook_give_up_after:
        await WebhookDelivery.filter(still_ours(row)).update(
            status=OutboxStatus.FAILED, last_error=error, claimed_at=None
        )
        log.error(
            "webhook %s to %s failed for good after %d attempt(s): %s",
            row.id,
            row.url,
            row.attempts,
            error,
        )
        return
    delay = backoff_s(
        row.attempts,
        base=settings.webhook_backoff_base,
        cap=settings.webhook_backoff_max,
        jitter=JITTER,
    )
    await WebhookDelivery.filter(still_ours(row)).update(
        status=OutboxStatus.PENDING,
        last_error=error,
        claimed_at=None,
        next_attempt_at=now + timedelta(seconds=delay),
    )
    log.warning(
        "webhook %s: attempt %d failed (%s); retrying in %.1fs",
        row.id,
        row.attempts,
        error,
        delay,
    )


async def _deliver(
    session: aiohttp.ClientSession,
    row: WebhookDelivery,
    secrets: list[str],
    settings: JobsSettings,
    slots: asyncio.Semaphore,
) -> None:
    async with slots:
        try:
            error = await post(session, row, secrets, settings)
        except Refused as refused:
            await _record(row, f"refused: {refused}", settings, final=True)
            return
        await _record(row, error, settings, final=False)
    if error is None:
        log.info("webhook %s delivered to %s", message_id(row.id), row.url)


def open_session(settings: JobsSettings) -> aiohttp.ClientSession:
    """A client that connects only to checked addresses, keeps no cookies and
    no connections, and uses no proxy from the environment."""
    resolver = CheckedResolver(
        allow_private=settings.webhook_allow_private,
        timeout_s=settings.webhook_timeout,
    )
    connector = aiohttp.TCPConnector(
        resolver=resolver,
        use_dns_cache=False,
        force_close=True,
        limit=settings.webhook_concurrency,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
    )


async def send_round(resources: JobsResources) -> int:
    """Claim and POST due deliveries until none are left; how many were tried."""
    settings = resources.settings
    tried = 0
    slots = asyncio.Semaphore(settings.webhook_concurrency)
    session: aiohttp.ClientSession | None = None
    try:
        while True:
            rows = await claim_due(settings)
            if not rows:
                return tried
            session = session or open_session(settings)
            secrets = await _signing_secrets(rows, settings)
            # A generation purged since the claim took its deliveries along.
            await asyncio.gather(
                *(
                    _deliver(session, row, signing, settings, slots)
                    for row in rows
                    if (signing := secrets.get(row.generation_id))  # type: ignore[attr-defined]
                )
            )
            tried += len(rows)
            if len(rows) < BATCH_SIZE:
                return tried
    finally:
        if session is not None:
            await session.close()


async def send_due_webhooks(resources: JobsResources) -> None:
    """Periodic task of the jobs worker: POST whatever deliveries are due."""
    await send_round(resources)

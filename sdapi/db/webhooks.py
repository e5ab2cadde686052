"""Webhooks in the database: account secrets, the deliveries outbox, signatures.

Secrets are not stored: each is derived from SDAPI_SECRET_KEY and a random
key id kept on the account (HMAC-SHA256), so a copy of the database alone
cannot sign for anyone, and no encryption key has to be managed beside the
one every process already holds. Rotating SDAPI_SECRET_KEY changes them all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from tortoise.transactions import in_transaction

from sdapi.contract.status import Status
from sdapi.contract.webhooks import (
    BODY_MAX_BYTES,
    PREVIOUS_SECRET_TTL_S,
    WebhookEvent,
)
from sdapi.db.models import (
    GeneratedImage,
    Generation,
    OutboxStatus,
    User,
    WebhookDelivery,
    utcnow,
)
from sdapi.infra.links import signed_image_url

# The Standard Webhooks spelling of a secret (a prefix, not a secret).
SECRET_PREFIX = "whsec_"  # noqa: S105
# Longest last_error kept (characters).
ERROR_LIMIT = 1000


def derive_secret(secret_key: str, user_id: uuid.UUID, key_id: str) -> str:
    """The `whsec_` secret of an account's key id (32 random-looking bytes)."""
    master = hashlib.sha256(b"sdapi webhook secrets\n" + secret_key.encode()).digest()
    raw = hmac.new(master, f"{user_id}\n{key_id}".encode(), hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(raw).decode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """One `webhook-signature` entry: `v1,<base64 HMAC-SHA256 of id.timestamp.body>`."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def message_id(delivery_id: uuid.UUID) -> str:
    """The `webhook-id` of a delivery (the same on every attempt)."""
    return f"msg_{delivery_id.hex}"


@dataclass(frozen=True)
class AccountSecrets:
    """An account's signing secret, and the one its last rotation replaced."""

    secret: str
    previous: str | None
    previous_expires_at: datetime | None

    def signing(self, now: datetime) -> list[str]:
        """The secrets that sign at `now`: the current one, and the previous
        one for PREVIOUS_SECRET_TTL_S after the rotation."""
        found = [self.secret]
        if self.previous is not None and self.previous_expires_at is not None:
            if now < self.previous_expires_at:
                found.append(self.previous)
        return found


def _secrets_of(user: User, secret_key: str) -> AccountSecrets:
    if user.webhook_key_id is None:
        raise ValueError(f"account {user.id} has no webhook key id yet")
    previous = expires = None
    if user.webhook_previous_key_id and user.webhook_rotated_at is not None:
        previous = derive_secret(secret_key, user.id, user.webhook_previous_key_id)
        expires = user.webhook_rotated_at + timedelta(seconds=PREVIOUS_SECRET_TTL_S)
    return AccountSecrets(
        secret=derive_secret(secret_key, user.id, user.webhook_key_id),
        previous=previous,
        previous_expires_at=expires,
    )


async def account_secrets(user_id: uuid.UUID, secret_key: str) -> AccountSecrets:
    """The account's secrets; the first call gives the account its key id."""
    user = await User.get(id=user_id)
    if user.webhook_key_id is None:
        # Two first calls at once agree: only a NULL is filled in.
        await User.filter(id=user_id, webhook_key_id=None).update(
            webhook_key_id=secrets.token_hex(16)
        )
        user = await User.get(id=user_id)
    return _secrets_of(user, secret_key)


async def rotate_secret(user_id: uuid.UUID, secret_key: str) -> AccountSecrets:
    """A new secret; the current one keeps signing for PREVIOUS_SECRET_TTL_S."""
    async with in_transaction():
        user = await User.select_for_update().get(id=user_id)
        user.webhook_previous_key_id = user.webhook_key_id
        user.webhook_key_id = secrets.token_hex(16)
        user.webhook_rotated_at = utcnow()
        await user.save(
            update_fields=[
                "webhook_key_id",
                "webhook_previous_key_id",
                "webhook_rotated_at",
            ]
        )
    return _secrets_of(user, secret_key)


def _time(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


async def delivery_summary(generation: Generation) -> dict[str, Any] | None:
    """`Generation.webhook`: its URL and events, and how the latest event's
    delivery went (None without a webhook)."""
    if not generation.webhook_url:
        return None
    latest = (
        await WebhookDelivery.filter(generation_id=generation.id)
        .order_by("-created_at", "-id")
        .first()
    )
    return {
        "url": generation.webhook_url,
        "events": list(generation.webhook_events or []),
        "event": latest.event if latest else None,
        "status": _delivery_status(latest.status) if latest else None,
        "attempts": latest.attempts if latest else 0,
        "delivered_at": _time(latest.delivered_at) if latest else None,
        "last_error": latest.last_error if latest else None,
    }


def _delivery_status(status: OutboxStatus) -> str:
    return {
        OutboxStatus.PENDING: "pending",
        OutboxStatus.SENDING: "sending",
        OutboxStatus.SENT: "delivered",
        OutboxStatus.FAILED: "failed",
    }[OutboxStatus(status)]


@dataclass(frozen=True)
class LinkSigner:
    """What image URLs in a payload are signed with (usable without a token)."""

    secret_key: str
    base_url: str

    def image(self, generation_id: uuid.UUID, image: dict[str, Any]) -> dict[str, Any]:
        return {
            "index": image["index"],
            "seed": image["seed"],
            "url": signed_image_url(
                self.secret_key, self.base_url, generation_id, image["index"]
            ),
            "width": image["width"],
            "height": image["height"],
        }


async def generation_data(generation: Generation, links: LinkSigner) -> dict[str, Any]:
    """The generation as `GET /api/v1/generations/{id}` shows it (web's
    `GenerationView`; tests/jobs/test_webhooks.py checks they agree), without
    the live details (queue position, progress, estimates: they are read
    from Redis by web and stale by the time a delivery arrives), with signed
    image URLs."""
    images = (
        await GeneratedImage.filter(generation_id=generation.id)
        .order_by("index")
        .values("index", "seed", "width", "height")
    )
    error = None
    if generation.error_code:
        error = {"code": generation.error_code, "message": generation.error_message}
    return {
        "id": str(generation.id),
        "status": Status(generation.status).value,
        "tier": str(generation.tier),
        "request": generation.request,
        "created_at": _time(generation.created_at),
        "scheduled_for": _time(generation.scheduled_for),
        "started_at": _time(generation.started_at),
        "finished_at": _time(generation.finished_at),
        "queue_position": None,
        "waiting_for_node": False,
        "progress": None,
        "eta_s": None,
        "eta": None,
        "images": [links.image(generation.id, image) for image in images],
        "error": error,
        "delivery": str(generation.delivery),
        "emailed_at": _time(generation.emailed_at),
        "warnings": list(generation.warnings or []),
        "webhook": await delivery_summary(generation),
    }


def wants(generation: Generation, event: WebhookEvent) -> bool:
    """Whether the generation's webhook asked for `event`."""
    return bool(generation.webhook_url) and event.value in (
        generation.webhook_events or []
    )


async def queue_webhook_event(
    generation: Generation,
    event: WebhookEvent,
    links: LinkSigner,
    *,
    image_index: int | None = None,
) -> bool:
    """Write `event` of `generation` to the deliveries outbox, once.

    Call it inside the transaction that makes the event true (with the row's
    new state set on `generation`), so the delivery exists exactly when the
    change does; the dedupe key makes a second call change nothing. True if
    the webhook asked for the event.
    """
    if not wants(generation, event):
        return False
    now = utcnow()
    data = await generation_data(generation, links)
    payload: dict[str, Any] = {"type": event.type, "timestamp": _time(now)}
    key = f"{generation.id}:{event.value}"
    if image_index is not None:
        key += f":{image_index}"
        payload["image"] = next(
            (image for image in data["images"] if image["index"] == image_index), None
        )
    payload["data"] = data
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    too_big = len(body.encode()) > BODY_MAX_BYTES
    delivery = WebhookDelivery(
        id=uuid.uuid4(),
        generation=generation,
        event=event.value,
        dedupe_key=key,
        url=generation.webhook_url,
        body="" if too_big else body,
        status=OutboxStatus.FAILED if too_big else OutboxStatus.PENDING,
        last_error=f"the payload is over {BODY_MAX_BYTES} bytes" if too_big else None,
    )
    await WebhookDelivery.bulk_create([delivery], ignore_conflicts=True)
    return True


async def queue_completed(generations: list[Generation], links: LinkSigner) -> bool:
    """`completed` for each of `generations` (inside the caller's transaction);
    True if any webhook asked for it."""
    queued = False
    for generation in generations:
        queued |= await queue_webhook_event(generation, WebhookEvent.COMPLETED, links)
    return queued

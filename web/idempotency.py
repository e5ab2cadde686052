"""Idempotent submits: a retry with the same `Idempotency-Key` gets the first answer.

Keys are stored per user as SHA-256 (scoped by route) with the SHA-256 of the
request that used them, inside the submit's transaction, so a generation and
its key are committed together and the quota is charged once.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sdapi.db.models import (
    IDEMPOTENCY_KEY_TTL,
    Generation,
    IdempotencyKey,
    User,
)
from web.errors import Conflict, ValidationFailed

HEADER = "Idempotency-Key"
KEY_MAX_CHARS = 255


@dataclass(frozen=True)
class IdempotencyClaim:
    """A submit's key and body, both hashed."""

    key_hash: str
    body_hash: str


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def claim_from(
    headers: Any, scope: str, fingerprint: dict[str, Any]
) -> IdempotencyClaim | None:
    """The claim of a request with an `Idempotency-Key` header, else None.

    `fingerprint` is everything the request asked for (JSON-able): retries
    must send the same, or get a 409.
    """
    key = headers.get(HEADER)
    if key is None:
        return None
    if not 1 <= len(key) <= KEY_MAX_CHARS or not key.isprintable():
        raise ValidationFailed(
            details=[
                {
                    "field": HEADER,
                    "message": f"1 to {KEY_MAX_CHARS} printable characters.",
                }
            ]
        )
    body = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return IdempotencyClaim(
        key_hash=_sha256(f"{scope}\n{key}"), body_hash=_sha256(body)
    )


def file_digest(data: bytes) -> str:
    """How an uploaded file enters a fingerprint."""
    return hashlib.sha256(data).hexdigest()


async def find_replay(
    user_id: uuid.UUID, claim: IdempotencyClaim, now: datetime
) -> Generation | None:
    """The generation this key made within 24 h (409 if for another body)."""
    rows = await IdempotencyKey.filter(
        user_id=user_id,
        key_hash=claim.key_hash,
        created_at__gte=now - IDEMPOTENCY_KEY_TTL,
    ).values_list("body_hash", "generation_id")
    if not rows:
        return None
    body_hash, generation_id = rows[0]
    if body_hash != claim.body_hash:
        raise Conflict(
            "This Idempotency-Key was already used with a different request; "
            "use a new key for a new request."
        )
    return await Generation.get(id=generation_id)


async def record(
    user: User, claim: IdempotencyClaim, generation: Generation, now: datetime
) -> None:
    """Remember the key for `generation` (inside the submit's transaction)."""
    # An expired use of the same key makes room: the key is free again.
    await IdempotencyKey.filter(
        user_id=user.id,
        key_hash=claim.key_hash,
        created_at__lt=now - IDEMPOTENCY_KEY_TTL,
    ).delete()
    await IdempotencyKey.create(
        id=uuid.uuid4(),
        user=user,
        key_hash=claim.key_hash,
        body_hash=claim.body_hash,
        generation=generation,
    )

"""Bearer tokens and sessions: 256-bit secrets of which only SHA-256 is stored.

Issuing one is `sdapi.db.tokens` (the development tools make tokens too);
finding, using and revoking them is here.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime

from redis.asyncio import Redis
from redis.exceptions import RedisError
from tortoise.queryset import QuerySet

from sdapi.contract.names import REVOKED_TOKENS_CHANNEL
from sdapi.db.models import ApiToken, TokenKind, utcnow
from sdapi.db.tokens import TOKEN_PREFIX

# Re-exported: the handlers issue and check tokens through this module.
from sdapi.db.tokens import hash_secret as hash_secret
from sdapi.db.tokens import issue_token as issue_token

# How stale `last_used_at` may get before a use writes it again (seconds):
# a busy token costs one write a minute, not one per request.
LAST_USED_RESOLUTION_S = 60


async def note_use(token: ApiToken, now: datetime | None = None) -> None:
    """Record that `token` was just used (to the minute)."""
    now = now or utcnow()
    last = token.last_used_at
    if last is not None and (now - last).total_seconds() < LAST_USED_RESOLUTION_S:
        return
    await ApiToken.filter(id=token.id).update(last_used_at=now)
    token.last_used_at = now


def live_tokens(now: datetime | None = None) -> QuerySet[ApiToken]:
    """Tokens neither revoked nor expired at `now`: the only ones that work."""
    return ApiToken.filter(revoked_at=None, expires_at__gt=now or utcnow())


async def find_token(secret: str, *, now: datetime | None = None) -> ApiToken | None:
    """The live token (with its user) for `secret`, or None."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    return (
        await live_tokens(now)
        .filter(token_hash=hash_secret(secret))
        .select_related("user")
        .first()
    )


def _token_uuid(token_id: uuid.UUID | str) -> uuid.UUID | None:
    if isinstance(token_id, uuid.UUID):
        return token_id
    try:
        return uuid.UUID(token_id)
    except ValueError:
        return None


async def find_token_by_id(
    token_id: uuid.UUID | str,
    *,
    kind: TokenKind | None = None,
    now: datetime | None = None,
) -> ApiToken | None:
    """The live token (with its user) with id `token_id` (of `kind`), or None."""
    ident = _token_uuid(token_id)
    if ident is None:
        return None
    query = live_tokens(now).filter(id=ident)
    if kind is not None:
        query = query.filter(kind=kind)
    return await query.select_related("user").first()


async def revoke_token(
    token_id: uuid.UUID | str,
    *,
    kind: TokenKind | None = None,
    now: datetime | None = None,
) -> None:
    """Stop the token with id `token_id` (of `kind`) working at once."""
    ident = _token_uuid(token_id)
    if ident is None:
        return
    now = now or utcnow()
    query = live_tokens(now).filter(id=ident)
    if kind is not None:
        query = query.filter(kind=kind)
    await query.update(revoked_at=now)


async def announce_revoked(redis: Redis, token_id: uuid.UUID | str) -> None:
    """Tell every web replica to close the WebSockets of a revoked token."""
    # Best effort: a replica that misses it closes them at its next re-check.
    with contextlib.suppress(RedisError, OSError):
        await redis.publish(REVOKED_TOKENS_CHANNEL, str(token_id).encode())

"""Bearer tokens and sessions: 256-bit secrets of which only SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import datetime, timedelta

from tortoise.queryset import QuerySet

from web.models import ApiToken, TokenKind, User, utcnow

TOKEN_PREFIX = "sdapi_"  # noqa: S105 (a public marker, not a secret)


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a high-entropy secret (a salt adds nothing at 256 bits)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A fresh 256-bit secret, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


async def issue_token(
    user: User, *, kind: TokenKind, ttl_s: int, now: datetime | None = None
) -> tuple[str, ApiToken]:
    """Create a token for `user`; the secret is returned once and never stored."""
    secret = new_secret()
    now = now or utcnow()
    token = await ApiToken.create(
        user=user,
        kind=kind,
        token_hash=hash_secret(secret),
        expires_at=now + timedelta(seconds=ttl_s),
    )
    return secret, token


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

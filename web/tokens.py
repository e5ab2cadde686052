"""Bearer tokens and sessions: 256-bit secrets of which only SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

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


async def find_token(secret: str, *, now: datetime | None = None) -> ApiToken | None:
    """The live token (with its user) for `secret`, or None."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    now = now or utcnow()
    return (
        await ApiToken.filter(
            token_hash=hash_secret(secret), revoked_at=None, expires_at__gt=now
        )
        .select_related("user")
        .first()
    )


async def find_token_by_id(
    token_id: str, *, now: datetime | None = None
) -> ApiToken | None:
    """The live session token with id `token_id` (from a session), or None."""
    now = now or utcnow()
    return (
        await ApiToken.filter(
            id=token_id, kind=TokenKind.SESSION, revoked_at=None, expires_at__gt=now
        )
        .select_related("user")
        .first()
    )


async def revoke_token(token: ApiToken, *, now: datetime | None = None) -> None:
    """Stop `token` working at once."""
    await ApiToken.filter(id=token.id, revoked_at=None).update(
        revoked_at=now or utcnow()
    )

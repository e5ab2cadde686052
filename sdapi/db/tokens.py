"""API tokens as stored: 256-bit secrets of which only SHA-256 is kept.

Issuing is here, below the web app, so the development tools (test and
benchmark users) make tokens exactly as sign-in does; `web.tokens` finds,
uses and revokes them.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sdapi.db.models import ApiToken, TokenKind, User, utcnow

TOKEN_PREFIX = "sdapi_"  # noqa: S105 (a public marker, not a secret)


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a high-entropy secret (a salt adds nothing at 256 bits)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A fresh 256-bit secret, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


async def issue_token(
    user: User,
    *,
    kind: TokenKind,
    ttl_s: int | None = None,
    expires_at: datetime | None = None,
    name: str = "",
    now: datetime | None = None,
) -> tuple[str, ApiToken]:
    """Create a token for `user` expiring after `ttl_s` (or at `expires_at`);
    the secret is returned once and never stored."""
    secret = new_secret()
    now = now or utcnow()
    if expires_at is None:
        if ttl_s is None:
            raise ValueError("a token needs ttl_s or expires_at")
        expires_at = now + timedelta(seconds=ttl_s)
    token = await ApiToken.create(
        user=user,
        kind=kind,
        name=name,
        token_hash=hash_secret(secret),
        expires_at=expires_at,
    )
    return secret, token

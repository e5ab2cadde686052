"""Users for tests and benchmarks, written straight to the database.

One helper for every suite and benchmark that needs a signed-in user: it
skips sign-up (no password, no mail) and issues a bearer token the way
sign-in does. Tortoise must be open.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import NamedTuple

from sdapi.db.models import TokenKind, User, utcnow
from sdapi.db.tokens import issue_token

# A token outlives any test or benchmark run (seconds).
TOKEN_TTL_S = 3600


class DevUser(NamedTuple):
    """A stored user and the secret of its bearer token."""

    user: User
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        """The Authorization header of its token."""
        return auth(self.secret)


def auth(secret: str) -> dict[str, str]:
    """The Authorization header of a bearer token."""
    return {"Authorization": f"Bearer {secret}"}


async def make_user(
    *, premium: bool = True, verified: bool = True, email: str | None = None
) -> DevUser:
    """A user (premium for 30 days unless told otherwise) with a bearer token."""
    now = utcnow()
    address = email or f"user-{uuid.uuid4().hex[:8]}@example.org"
    user = await User.create(
        id=uuid.uuid4(),
        email=address,
        email_key=address.lower(),
        password_hash="!",  # noqa: S106 (no password: token sign-in only)
        premium_until=now + timedelta(days=30) if premium else None,
        email_verified_at=now if verified else None,
    )
    secret, _ = await issue_token(user, kind=TokenKind.BEARER, ttl_s=TOKEN_TTL_S)
    return DevUser(user, secret)

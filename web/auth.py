"""Who is calling: a bearer token, or the playground's session cookie."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from aiohttp_session import get_session

from sdapi.contract.status import Tier
from sdapi.db.models import ApiToken, TokenKind, User, utcnow
from web.appkeys import settings_key
from web.errors import Forbidden, Unauthorized
from web.token_cache import cached_lookup
from web.tokens import find_token, find_token_by_id, hash_secret, note_use

CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    user: User
    token: ApiToken
    via: Literal["bearer", "session"]

    @property
    def tier(self) -> Tier:
        return self.user.tier_at(utcnow())


# Who the request turned out to be (None: anonymous), looked up once.
principal_key: web.RequestKey[Principal | None] = web.RequestKey("principal")


def bearer_secret(request: web.Request) -> str | None:
    """The bearer token of the Authorization header, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        return None
    return secret.strip()


def origin_allowed(request: web.Request) -> bool:
    """Whether the request's Origin is one of ours (cookie use needs this)."""
    origin = request.headers.get("Origin")
    return origin is not None and origin in request.app[settings_key].origins()


async def authenticate(
    request: web.Request, *, token: str | None = None
) -> Principal | None:
    """The caller, from a bearer token (header or `token`) or the session cookie."""
    if principal_key in request:
        return request[principal_key]
    principal: Principal | None = None
    secret = token or bearer_secret(request)
    if secret is not None:
        found = await cached_lookup(
            request.app, hash_secret(secret), lambda: find_token(secret)
        )
        if found is None:
            raise Unauthorized("The token is invalid, expired or revoked.")
        await note_use(found)
        principal = Principal(found.user, found, "bearer")
    else:
        session = await get_session(request)
        token_id = session.get("token_id")
        if isinstance(token_id, str):
            found = await find_token_by_id(token_id, kind=TokenKind.SESSION)
            if found is None:
                session.invalidate()
            else:
                principal = Principal(found.user, found, "session")
    request[principal_key] = principal
    return principal


async def require_user(request: web.Request) -> Principal:
    """The caller, or 401; a cookie-authenticated unsafe request needs CSRF proof."""
    principal = await authenticate(request)
    if principal is None:
        raise Unauthorized()
    if principal.via == "session" and request.method not in SAFE_METHODS:
        await check_csrf(request)
    return principal


async def check_csrf(request: web.Request) -> None:
    """The session's CSRF token must come back in a header from one of our origins."""
    session = await get_session(request)
    expected = session.get("csrf")
    given = request.headers.get(CSRF_HEADER, "")
    # Compared as bytes: compare_digest refuses str with non-ASCII characters.
    if not isinstance(expected, str) or not hmac.compare_digest(
        expected.encode(), given.encode("utf-8", "surrogatepass")
    ):
        raise Forbidden("Missing or wrong CSRF token (send the X-CSRF-Token header).")
    if "Origin" in request.headers and not origin_allowed(request):
        raise Forbidden("Cross-origin requests may not use the session cookie.")

"""Server-side sessions in Redis for the playground (revocable, never in cookies)."""

from __future__ import annotations

import secrets

from aiohttp import web
from aiohttp_session import AbstractStorage
from aiohttp_session.redis_storage import RedisStorage
from redis.asyncio import Redis

from web.keys import redis_key

SESSION_COOKIE = "sdapi_session"
SESSION_KEY_PREFIX = SESSION_COOKIE + "_"  # aiohttp-session's own key layout


class AppRedisStorage(RedisStorage):
    """aiohttp-session's Redis storage on the app's client, opened in cleanup_ctx.

    The middleware is built with the app, before the Redis client exists, so
    the client is looked up when a request needs it.
    """

    def __init__(self, app: web.Application, *, max_age: int, secure: bool) -> None:
        AbstractStorage.__init__(
            self,
            cookie_name=SESSION_COOKIE,
            max_age=max_age,
            secure=secure,
            httponly=True,
            samesite="Lax",
        )
        self._app = app
        self._key_factory = lambda: secrets.token_urlsafe(32)

    @property  # type: ignore[override,unused-ignore]
    def _redis(self) -> Redis:  # type: ignore[override]
        return self._app[redis_key]


async def delete_session(redis: Redis, session_id: str) -> None:
    """Revoke a session server-side, whatever its cookie says."""
    await redis.delete(SESSION_KEY_PREFIX + session_id)

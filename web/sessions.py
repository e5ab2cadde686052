"""Server-side sessions in Redis for the playground (revocable, never in cookies)."""

from __future__ import annotations

import json
import secrets

from aiohttp import web
from aiohttp_session import AbstractStorage, Session
from redis.asyncio import Redis

from sdapi.contract.names import SESSION_KEY_PREFIX
from web.appkeys import redis_deadline_key, redis_key

SESSION_COOKIE = "sdapi_session"


class AppRedisStorage(AbstractStorage):
    """Sessions in the app's Redis client, which `cleanup_ctx` opens.

    The middleware is built with the app, before that client exists, so it
    is looked up per request. The cookie holds only a random session id.
    """

    def __init__(self, app: web.Application, *, max_age: int, secure: bool) -> None:
        super().__init__(
            cookie_name=SESSION_COOKIE,
            max_age=max_age,
            secure=secure,
            httponly=True,
            samesite="Lax",
        )
        self._app = app

    async def load_session(self, request: web.Request) -> Session:
        session_id = self.load_cookie(request)
        if session_id is None:
            return Session(None, data=None, new=True, max_age=self.max_age)
        # Within the request's Redis budget, as everything else it asks Redis.
        raw = await request[redis_deadline_key].run(
            self._app[redis_key].get(SESSION_KEY_PREFIX + str(session_id))
        )
        if raw is None:
            return Session(None, data=None, new=True, max_age=self.max_age)
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        return Session(str(session_id), data=data, new=False, max_age=self.max_age)

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        session_id = session.identity
        if session_id is None:
            session_id = secrets.token_urlsafe(32)
            self.save_cookie(response, session_id, max_age=session.max_age)
        else:
            session_id = str(session_id)
            # An emptied session (sign-out) clears its cookie.
            cookie = "" if session.empty else session_id
            self.save_cookie(response, cookie, max_age=session.max_age)
        await request[redis_deadline_key].run(
            self._app[redis_key].set(
                SESSION_KEY_PREFIX + session_id,
                json.dumps(self._get_session_data(session)),
                ex=session.max_age,
            )
        )


async def delete_session(redis: Redis, session_id: str) -> None:
    """Revoke a session server-side, whatever its cookie says."""
    await redis.delete(SESSION_KEY_PREFIX + session_id)

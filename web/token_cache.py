"""Bearer tokens this replica looked up lately, with their users.

A hit saves the token query of every request. A revoked token must still stop
working at once on every replica, so an entry is served only while this
replica hears the revocation broadcast (sdapi/contract/names.py), each
revocation or user change heard drops what it names, a broadcast lost to a
Redis restart empties the cache, and no entry outlives `token_cache_ttl_s`
(a change whose broadcast could not be published shows within that).
docs/ARCHITECTURE.md ("The token cache") tells the whole story.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sdapi.contract.names import USERS_CHANGED_CHANNEL
from sdapi.db.models import ApiToken, utcnow
from sdapi.infra.pubsub import Listener
from web.appkeys import redis_key, settings_key
from web.tokens import announce_revoked


@dataclass
class _Entry:
    token: ApiToken
    stored_at: float


class TokenCache:
    """Token hash -> live token (with its user), bounded in size and age."""

    def __init__(self, listener: Listener, *, size: int, ttl_s: float) -> None:
        self._listener = listener
        self._size = size
        self._ttl_s = ttl_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._subscription = listener.subscriptions
        # Bumped by every invalidation heard: a lookup that raced one is
        # not stored (it may have read the row just before the revocation).
        self._invalidations = 0

    def _usable(self) -> bool:
        subscription = self._listener.subscriptions
        if subscription != self._subscription:
            # Resubscribed: what was broadcast in between is lost.
            self._entries.clear()
            self._subscription = subscription
        return self._size > 0 and self._listener.subscribed.is_set()

    @property
    def ready(self) -> bool:
        """Whether it serves hits now (it hears the broadcasts)."""
        return self._usable()

    def get(self, token_hash: str) -> ApiToken | None:
        """The cached live token for this hash, or None (look it up)."""
        if not self._usable():
            return None
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        if (
            time.monotonic() - entry.stored_at > self._ttl_s
            or entry.token.expires_at <= utcnow()
        ):
            del self._entries[token_hash]
            return None
        self._entries.move_to_end(token_hash)
        return entry.token

    def mark(self) -> tuple[int, int]:
        """Taken before a lookup in the database, given back to `put`."""
        return self._subscription, self._invalidations

    def put(self, token_hash: str, token: ApiToken, mark: tuple[int, int]) -> None:
        """Keep a token read from the database after `mark`."""
        if not self._usable() or mark != (self._subscription, self._invalidations):
            return
        self._entries[token_hash] = _Entry(token, time.monotonic())
        self._entries.move_to_end(token_hash)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def forget_token(self, token_id: uuid.UUID | str) -> None:
        """Drop the token with this id (revoked)."""
        self._drop(lambda token: str(token.id) == str(token_id))

    def forget_user(self, user_id: uuid.UUID | str) -> None:
        """Drop every token of this user (their row changed)."""
        self._drop(lambda token: str(token.user_id) == str(user_id))  # type: ignore[attr-defined]

    def _drop(self, matches: Callable[[ApiToken], bool]) -> None:
        self._invalidations += 1
        for key in [k for k, e in self._entries.items() if matches(e.token)]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


token_cache_key = web.AppKey("token_cache", TokenCache)


def new_token_cache(app: web.Application, listener: Listener) -> TokenCache:
    """The replica's cache, kept true by `listener` (web/live_socket.py
    revocations_ctx: one subscription for the sockets and the cache), which
    must dispatch `USERS_CHANGED_CHANNEL` to `forget_user` and revocations to
    `forget_token`."""
    settings = app[settings_key]
    cache = TokenCache(
        listener, size=settings.token_cache_size, ttl_s=settings.token_cache_ttl_s
    )
    app[token_cache_key] = cache
    return cache


async def cached_lookup(
    app: web.Application,
    token_hash: str,
    lookup: Callable[[], Awaitable[ApiToken | None]],
) -> ApiToken | None:
    """The live token for `token_hash`: from the cache, or `lookup` (then kept)."""
    cache = app[token_cache_key]
    token = cache.get(token_hash)
    if token is not None:
        return token
    mark = cache.mark()
    token = await lookup()
    if token is not None:
        cache.put(token_hash, token, mark)
    return token


async def revoked_everywhere(app: web.Application, token_id: uuid.UUID | str) -> None:
    """After a revocation: out of this replica's cache at once, then of the
    others' (and their WebSockets closed) by the broadcast."""
    app[token_cache_key].forget_token(token_id)
    await announce_revoked(app[redis_key], token_id)


async def announce_user_changed(app: web.Application, user_id: uuid.UUID) -> None:
    """Tell every replica (this one at once) to re-read this user's row."""
    app[token_cache_key].forget_user(user_id)
    # A replica that misses it is resubscribing, and then empties its cache.
    with contextlib.suppress(RedisError, OSError):
        redis: Redis = app[redis_key]
        await redis.publish(USERS_CHANGED_CHANNEL, str(user_id).encode())

"""Sign-in throttling: failures per email and per client address, in Redis.

Each key holds a sorted set of failure times (a sliding window). A caller over
either limit is refused before the password is checked, so guessing learns
nothing and costs us no bcrypt; Retry-After is when the oldest counted failure
leaves the window. Only the newest `limit` failures are kept per key, so a
flood cannot grow a key without bound.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

KEY_PREFIX = "sdapi:signin-failures"


@dataclass(frozen=True)
class Limit:
    """At most `max_failures` failures for one key within `window_s` seconds."""

    key: str
    max_failures: int
    window_s: int


def email_limit(email_key: str, *, max_failures: int, window_s: int) -> Limit:
    """The limit for one account name (hashed: Redis never holds the address)."""
    digest = hashlib.sha256(email_key.encode()).hexdigest()
    return Limit(f"{KEY_PREFIX}:email:{digest}", max_failures, window_s)


def client_limit(address: str, *, max_failures: int, window_s: int) -> Limit:
    """The limit for one client address."""
    return Limit(f"{KEY_PREFIX}:client:{address}", max_failures, window_s)


def client_address(request: web.Request, *, trust_forwarded: bool) -> str:
    """The caller's address; X-Forwarded-For only behind a proxy we run.

    The last X-Forwarded-For entry is the one our proxy appended; entries
    before it come from the client and can be forged.
    """
    if trust_forwarded:
        forwarded = request.headers.get("X-Forwarded-For", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1]
    return request.remote or "unknown"


async def retry_after(
    redis: Redis, limits: list[Limit], *, now: float | None = None
) -> int:
    """Seconds until every limit allows another try; 0 when none is exceeded."""
    now = time.time() if now is None else now
    wait = 0.0
    async with redis.pipeline(transaction=False) as pipe:
        for limit in limits:
            pipe.zremrangebyscore(limit.key, "-inf", now - limit.window_s)
            pipe.zcard(limit.key)
            pipe.zrange(limit.key, 0, 0, withscores=True)
        results = await pipe.execute()
    for index, limit in enumerate(limits):
        count = int(results[index * 3 + 1])
        oldest = results[index * 3 + 2]
        if count >= limit.max_failures and oldest:
            frees_at = float(oldest[0][1]) + limit.window_s
            wait = max(wait, frees_at - now)
    return math.ceil(wait) if wait > 0 else 0


async def record_failure(
    redis: Redis, limits: list[Limit], *, now: float | None = None
) -> None:
    """Count one failed sign-in against every limit."""
    now = time.time() if now is None else now
    async with redis.pipeline(transaction=True) as pipe:
        for limit in limits:
            member = f"{now:.6f}:{secrets.token_hex(4)}"
            pipe.zadd(limit.key, {member: now})
            pipe.zremrangebyscore(limit.key, "-inf", now - limit.window_s)
            # Keep the newest max_failures entries: enough to decide and to
            # compute Retry-After.
            pipe.zremrangebyrank(limit.key, 0, -(limit.max_failures + 1))
            pipe.expire(limit.key, limit.window_s + 1)
        await pipe.execute()


async def clear(redis: Redis, limit: Limit) -> None:
    """Forget the failures of one key (after a successful sign-in)."""
    await redis.delete(limit.key)

"""Throttling of sign-ins and sign-ups: sliding windows of attempts, in Redis.

Each key holds a sorted set of attempt times (a sliding window). An attempt is
reserved before any work is done, in one Lua script that checks every limit
and counts the attempt against all of them atomically: of many concurrent
tries, only as many as a limit allows get through, the rest are refused
before a password is looked at (nothing learned, no bcrypt spent).
Retry-After is when the oldest counted attempt leaves the window. Sign-in
reservations that turn out to be successes are released again; failures stay
counted. Only the newest `max_attempts` entries are kept per key, so a flood
cannot grow a key without bound.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from sdapi.contract.names import SIGNIN_FAILURES_PREFIX as KEY_PREFIX
from sdapi.contract.names import SIGNUPS_PREFIX as SIGNUP_KEY_PREFIX
from web.errors import RateLimited

# KEYS: the limits' keys. ARGV: now, the attempt's member, then for each key
# its max_attempts and window (seconds). Returns "0" when the attempt was
# counted, else the seconds until every limit allows one (as a string: Redis
# would truncate a Lua number to an integer).
_RESERVE = """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local wait = 0
for i, key in ipairs(KEYS) do
  local max = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= max then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    local frees = tonumber(oldest[2]) + window - now
    if frees > wait then wait = frees end
  end
end
if wait > 0 then
  return tostring(wait)
end
for i, key in ipairs(KEYS) do
  local max = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  redis.call('ZADD', key, now, member)
  redis.call('ZREMRANGEBYRANK', key, 0, -(max + 1))
  redis.call('EXPIRE', key, math.ceil(window) + 1)
end
return '0'
"""


@dataclass(frozen=True)
class Limit:
    """At most `max_attempts` attempts for one key within `window_s` seconds."""

    key: str
    max_attempts: int
    window_s: int


@dataclass(frozen=True)
class Reservation:
    """The outcome of `reserve`: an attempt counted, or the wait until one is."""

    # The attempt's entry in every limit's key; None when refused.
    member: str | None
    # Seconds until every limit allows another attempt (0 when granted).
    retry_after: int

    @property
    def granted(self) -> bool:
        return self.member is not None


def email_limit(email_key: str, *, max_failures: int, window_s: int) -> Limit:
    """The slow, global sign-in limit of one account name, whoever guesses
    (hashed: Redis never holds the name)."""
    digest = hashlib.sha256(email_key.encode()).hexdigest()
    return Limit(f"{KEY_PREFIX}:email:{digest}", max_failures, window_s)


def client_email_limit(
    address: str, email_key: str, *, max_failures: int, window_s: int
) -> Limit:
    """The sign-in limit of one client guessing one account name: what an
    attacker elsewhere does to it never locks the owner's own client out."""
    digest = hashlib.sha256(f"{address}\n{email_key}".encode()).hexdigest()
    return Limit(f"{KEY_PREFIX}:pair:{digest}", max_failures, window_s)


def client_limit(address: str, *, max_failures: int, window_s: int) -> Limit:
    """The sign-in limit of one client address."""
    return Limit(f"{KEY_PREFIX}:client:{address}", max_failures, window_s)


def signup_limit(address: str, *, max_signups: int, window_s: int) -> Limit:
    """The sign-up limit of one client address."""
    return Limit(f"{SIGNUP_KEY_PREFIX}:client:{address}", max_signups, window_s)


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


async def reserve(
    redis: Redis, limits: Sequence[Limit], *, now: float | None = None
) -> Reservation:
    """Count one attempt against every limit, unless one of them is spent."""
    now = time.time() if now is None else now
    member = f"{now:.6f}:{secrets.token_hex(8)}"
    args: list[str | int | float] = [repr(now), member]
    for limit in limits:
        args.extend([limit.max_attempts, limit.window_s])
    script = redis.register_script(_RESERVE)
    reply = await script(keys=[limit.key for limit in limits], args=args)
    wait = float(reply.decode() if isinstance(reply, bytes) else reply)
    if wait > 0:
        return Reservation(member=None, retry_after=max(1, math.ceil(wait)))
    return Reservation(member=member, retry_after=0)


async def release(
    redis: Redis, reservation: Reservation, limits: Sequence[Limit]
) -> None:
    """Stop counting a reserved attempt against `limits` (it was no failure)."""
    if reservation.member is None or not limits:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for limit in limits:
            pipe.zrem(limit.key, reservation.member)
        await pipe.execute()


async def clear(redis: Redis, limit: Limit) -> None:
    """Forget every attempt of one key (after a successful sign-in)."""
    await redis.delete(limit.key)


async def reserve_or_refuse(
    redis: Redis, limits: list[Limit], what: str
) -> Reservation:
    """Count one attempt against `limits`, or 429 with Retry-After."""
    attempt = await reserve(redis, limits)
    if not attempt.granted:
        raise RateLimited(
            f"{what}; try again in {attempt.retry_after} seconds.",
            retry_after=attempt.retry_after,
        )
    return attempt

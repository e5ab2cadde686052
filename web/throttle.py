"""Throttling of sign-ins, sign-ups and resets: attempt windows in Redis.

Each key holds a sorted set of attempt times (a sliding window). An attempt is
reserved before any work is done, in one Lua script that checks every limit
and counts the attempt against all of them atomically: of many concurrent
tries, only as many as a limit allows get through, the rest are refused
before a password is looked at (nothing learned, no bcrypt spent).

A limit is either a hard window (Retry-After: when the oldest counted attempt
leaves it) or a backoff (past its free attempts, each attempt waits a delay
after the newest one, doubling per attempt up to a cap: slowed, never locked).
Sign-in reservations that turn out to be successes are released again;
failures stay counted. Only the newest entries a limit needs are kept per key,
so a flood cannot grow a key without bound. docs/SIGN_IN.md has the design.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from sdapi.contract.names import PASSWORD_RESET_ATTEMPTS_PREFIX as RESET_KEY_PREFIX
from sdapi.contract.names import SIGNIN_FAILURES_PREFIX as KEY_PREFIX
from sdapi.contract.names import SIGNIN_LIFTED_PREFIX as LIFTED_KEY_PREFIX
from sdapi.contract.names import SIGNUPS_PREFIX as SIGNUP_KEY_PREFIX
from web.errors import RateLimited

# KEYS: the limits' keys, then optionally the account's lifted-at key.
# ARGV: now, the attempt's member, the number of limits, then for each limit
# its max_attempts, window (seconds), entries to keep, backoff delay and cap
# (seconds; 0: a hard window) and whether a reset lifts it (1/0). Returns "0"
# when the attempt was counted, else the seconds until every limit allows one
# (as a string: Redis would truncate a Lua number to an integer).
_RESERVE = """
local now = tonumber(ARGV[1])
local member = ARGV[2]
local n = tonumber(ARGV[3])
local lifted = 0
if #KEYS > n then
  lifted = tonumber(redis.call('GET', KEYS[n + 1]) or '0')
end
local wait = 0
for i = 1, n do
  local key = KEYS[i]
  local at = 4 + 6 * (i - 1)
  local max = tonumber(ARGV[at])
  local window = tonumber(ARGV[at + 1])
  local delay = tonumber(ARGV[at + 3])
  local cap = tonumber(ARGV[at + 4])
  local since = now - window
  if ARGV[at + 5] == '1' and lifted > since then since = lifted end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', since)
  local count = redis.call('ZCARD', key)
  if count >= max then
    local frees
    if delay > 0 then
      local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
      local step = math.min(cap, delay * 2 ^ math.min(count - max, 30))
      frees = tonumber(newest[2]) + step - now
    else
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      frees = tonumber(oldest[2]) + window - now
    end
    if frees > wait then wait = frees end
  end
end
if wait > 0 then
  return tostring(wait)
end
for i = 1, n do
  local key = KEYS[i]
  local at = 4 + 6 * (i - 1)
  local window = tonumber(ARGV[at + 1])
  local keep = tonumber(ARGV[at + 2])
  redis.call('ZADD', key, now, member)
  redis.call('ZREMRANGEBYRANK', key, 0, -(keep + 1))
  redis.call('EXPIRE', key, math.ceil(window) + 1)
end
return '0'
"""


class Clock:
    """Where throttling reads the time (seconds since the epoch): the app
    holds one, so tests can move it instead of waiting."""

    def now(self) -> float:
        return time.time()


@dataclass(frozen=True)
class Backoff:
    """Past a limit's free attempts, each waits `delay_s` after the newest,
    doubled per attempt counted beyond them, at most `cap_s`."""

    delay_s: float
    cap_s: float

    @property
    def steps(self) -> int:
        """Attempts beyond the free ones after which the delay stops growing."""
        return max(0, math.ceil(math.log2(self.cap_s / self.delay_s))) + 1


@dataclass(frozen=True)
class Limit:
    """At most `max_attempts` attempts for one key within `window_s` seconds;
    with a backoff, that many without delay and the rest slowed down."""

    key: str
    max_attempts: int
    window_s: int
    backoff: Backoff | None = None
    # Whether a password reset of the account forgets its attempts.
    lifted_by_reset: bool = False

    @property
    def keep(self) -> int:
        """The newest entries kept: all that decide the answer."""
        if self.backoff is None:
            return self.max_attempts
        return self.max_attempts + self.backoff.steps


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


def _digest(*parts: str) -> str:
    # Hashed: Redis never holds account names, tokens or device ids.
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def lifted_key(email_key: str) -> str:
    """The key holding when a password reset last lifted the account's limits."""
    return f"{LIFTED_KEY_PREFIX}:{_digest(email_key)}"


def email_limit(
    email_key: str, *, free_failures: int, window_s: int, backoff: Backoff
) -> Limit:
    """The global sign-in limit of one account name, whoever guesses: past
    `free_failures` it slows guessing down, it never locks the owner out."""
    return Limit(
        f"{KEY_PREFIX}:email:{_digest(email_key)}",
        free_failures,
        window_s,
        backoff=backoff,
        lifted_by_reset=True,
    )


def client_email_limit(
    address: str, email_key: str, *, max_failures: int, window_s: int
) -> Limit:
    """The sign-in limit of one client guessing one account name: what an
    attacker elsewhere does to it never locks the owner's own client out."""
    return Limit(
        f"{KEY_PREFIX}:pair:{_digest(address, email_key)}",
        max_failures,
        window_s,
        lifted_by_reset=True,
    )


def device_limit(device_id: str, *, max_failures: int, window_s: int) -> Limit:
    """The sign-in limit of one device cookie: what its sign-ins count against
    instead of the client's and the account's limits."""
    return Limit(
        f"{KEY_PREFIX}:device:{_digest(device_id)}",
        max_failures,
        window_s,
        lifted_by_reset=True,
    )


def client_limit(address: str, *, max_failures: int, window_s: int) -> Limit:
    """The sign-in limit of one client address."""
    return Limit(f"{KEY_PREFIX}:client:{address}", max_failures, window_s)


def signup_limit(address: str, *, max_signups: int, window_s: int) -> Limit:
    """The sign-up limit of one client address."""
    return Limit(f"{SIGNUP_KEY_PREFIX}:client:{address}", max_signups, window_s)


def reset_client_limit(address: str, *, max_attempts: int, window_s: int) -> Limit:
    """Password reset attempts of one client address."""
    return Limit(f"{RESET_KEY_PREFIX}:client:{address}", max_attempts, window_s)


def reset_token_limit(token: str, *, max_attempts: int, window_s: int) -> Limit:
    """Password reset attempts with one token, from anywhere."""
    return Limit(f"{RESET_KEY_PREFIX}:token:{_digest(token)}", max_attempts, window_s)


def client_address(request: web.Request, *, trust_forwarded: bool) -> str:
    """The caller's address as throttling counts it; X-Forwarded-For only
    behind a proxy we run.

    The last X-Forwarded-For entry is the one our proxy appended; entries
    before it come from the client and can be forged.
    """
    address = request.remote or "unknown"
    if trust_forwarded:
        forwarded = request.headers.get("X-Forwarded-For", "")
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            address = hops[-1]
    return client_key(address)


def client_key(address: str) -> str:
    """An IPv6 address's /64, any other address itself.

    One IPv6 host is normally given a whole /64 and may use any address in
    it: counted by address, it would be endless clients.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


async def reserve(
    redis: Redis,
    limits: Sequence[Limit],
    *,
    now: float | None = None,
    email_key: str | None = None,
) -> Reservation:
    """Count one attempt against every limit, unless one of them is spent.

    With `email_key`, the attempts a password reset of that account lifted
    no longer count against the limits it lifts.
    """
    now = time.time() if now is None else now
    member = f"{now:.6f}:{secrets.token_hex(8)}"
    args: list[str | int | float] = [repr(now), member, len(limits)]
    for limit in limits:
        backoff = limit.backoff
        args.extend(
            [
                limit.max_attempts,
                limit.window_s,
                limit.keep,
                repr(float(backoff.delay_s)) if backoff else 0,
                repr(float(backoff.cap_s)) if backoff else 0,
                1 if limit.lifted_by_reset else 0,
            ]
        )
    keys = [limit.key for limit in limits]
    if email_key is not None:
        keys.append(lifted_key(email_key))
    script = redis.register_script(_RESERVE)
    reply = await script(keys=keys, args=args)
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


async def lift(redis: Redis, email_key: str, *, now: float, keep_s: int) -> None:
    """Forget every attempt counted against the account's limits until `now`
    (after a password reset); remembered for `keep_s`, the longest window."""
    await redis.set(lifted_key(email_key), repr(now), ex=keep_s)


async def reserve_or_refuse(
    redis: Redis,
    limits: list[Limit],
    what: str,
    *,
    now: float | None = None,
    email_key: str | None = None,
) -> Reservation:
    """Count one attempt against `limits`, or 429 with Retry-After."""
    attempt = await reserve(redis, limits, now=now, email_key=email_key)
    if not attempt.granted:
        raise RateLimited(
            f"{what}; try again in {attempt.retry_after} seconds.",
            retry_after=attempt.retry_after,
        )
    return attempt


# A daily counter's life: the first count of a day starts it (seconds).
DAY_S = 86400


async def count_today(redis: Redis, key: str) -> int:
    """Count one more at `key`, a counter that lives a day from its first
    count; the count so far, this one included."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, DAY_S, nx=True)
        count, _ = await pipe.execute()
    return int(count)

"""Fair order on premium queues: the tags, their scripts and their range.

This module speaks plain Redis (no arq): sdapi/infra/queue.py, the arq
adapter, calls it where it enqueues, claims, retries and drops jobs, and
passes it arq's key names.

arq serves a queue in the order of its sorted
set's scores, and a plain enqueue scores a job with the time it was made: one
user with forty requests in flight would hold a model's nodes while a user
who came a moment later waits behind all forty. A premium queue is scored by
start-time fair queueing instead, so that the sorted-set order *is* the
service order: the waiting jobs ranked before a waiting job are exactly those
that start before it (until a newcomer's turn is put ahead of it).
`queue_position` is the rank, so it also counts the running jobs ranked
before it: they stay in the set at their own tags, ahead of the waiting ones
except when a newcomer took the current round after a job of that round had
started. Whoever reads the work ahead of a job tells running jobs apart by
their claim keys (`job_is_running`).

- Virtual time V, per queue (`fair_clock_key`): the round of the job started
  last, raised by each worker as it starts a job (`advance_clock`, through
  arq's `on_job_start`). The last *started* round, not the smallest round
  still queued: a long job that runs for minutes would otherwise hold V back,
  and a newcomer would be given a burst of rounds ahead of everyone waiting.
- A finish tag F_u per user and queue (`fair_owner_key`): the round after
  their last job there. A new job's round is S = max(V, F_u) and F_u becomes
  S + 1, so a user's jobs take successive rounds, and a user with nothing
  queued (F_u <= V, or the key expired) starts at the current round: the user
  served least recently goes next, A1 A2 B1 C1 C2 A3 runs as
  A1 B1 C1 A2 C2 A3.
- The score is FAIR_BASE + S * ROUND_SLOTS + slot, the slot one past the last
  job already in round S (ties go by arrival). Scores are integers in
  [-2**53, 0), exact in a double, always below arq's "now": every fair job is
  due. `enqueue_tagged` does all of it in one script, so tagging needs no lock
  held across a round trip; any number of producers and nodes share a queue.
- Range: 2**37 rounds of 2**16 slots. V grows by one per round of service
  (one job of each waiting user), so even 200 rounds a second take 21 years;
  a queue idle for FAIR_STATE_TTL_S starts again at round 0 (the clock, the
  tags and the finish tags all expire). A round with more than 2**16 users
  puts the extra ones in its last slot, ordered among themselves by job id.
- The same work keeps its place: each job's score is kept (`fair_tag_key`,
  with its owner), and the next attempt of a generation (the reconciler's
  re-enqueue) is given its previous attempt's score, so it goes back to the
  front, not the back. A job whose node died keeps its score anyway (arq
  leaves it in the set); a drained one too.
- A retry (`Retry(defer=...)`): arq would re-score the job now + defer,
  behind every fair score, where new work would starve it; `_GatedWorker`
  keeps its score and holds its claim key for the defer instead, so nobody
  claims it until then and it is first in line after.
- A job cancelled while waiting (`drop_waiting_job`) gives its owner the
  round back.
- The cold-claim delay (`ClaimGate`) is a wait since the job was *enqueued*;
  a fair score says nothing about time, so a gated fair worker reads the
  enqueue time arq stores with the job, only when its gate asks for a wait.

Redis restarts keep all of this with the queue (AOF); a Redis that loses
everything loses the queues too, and the reconciler re-enqueues at fresh
tags. Batch queues stay arq's: their batches are packed fairly by the
dispatcher (jobs/dispatcher.py), and they are served by time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable
from typing import TypedDict, cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from sdapi.contract.names import (
    FAIR_STATE_TTL_S,
    fair_clock_key,
    fair_owner_key,
    fair_tag_key,
)

# A fair score is FAIR_BASE + round * ROUND_SLOTS + slot: integers in
# [-2**53, 0), exact in a double and below any time arq compares them with.
FAIR_BASE = -(2**53)
ROUND_SLOTS = 2**16
MAX_ROUND = 2**37 - 1
# KEYS: queue, job, result, clock, owner, tag, previous attempt's tag.
# ARGV: job id, job data, expiry ms, owner, ttl s, base, slots, max round.
# Returns the score, or nil when the job (or its result) exists already.
# Numbers go to Redis as numbers, never through tostring (14 digits).
_ENQUEUE_FAIR = """
if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then
  return false
end
local base, slots = tonumber(ARGV[6]), tonumber(ARGV[7])
local score = tonumber(redis.call('HGET', KEYS[7], 'score'))
if not score then
  local clock = tonumber(redis.call('GET', KEYS[4]) or 0)
  local finish = tonumber(redis.call('GET', KEYS[5]) or 0)
  local start = math.min(math.max(clock, finish), tonumber(ARGV[8]))
  local low = base + start * slots
  local last = redis.call('ZREVRANGEBYSCORE', KEYS[1], low + slots - 1, low,
                          'WITHSCORES', 'LIMIT', 0, 1)
  local slot = 0
  if last[2] then
    slot = math.min(tonumber(last[2]) - low + 1, slots - 1)
  end
  score = low + slot
  redis.call('SET', KEYS[5], start + 1, 'EX', ARGV[5])
  redis.call('SET', KEYS[4], clock, 'EX', ARGV[5])
end
redis.call('HSET', KEYS[6], 'score', score, 'owner', ARGV[4])
redis.call('EXPIRE', KEYS[6], ARGV[5])
redis.call('PSETEX', KEYS[2], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[1], score, ARGV[1])
return score
"""

# KEYS: clock. ARGV: the started job's score, base, slots, max round, ttl s.
_ADVANCE_CLOCK = """
local score = tonumber(ARGV[1])
local base, slots = tonumber(ARGV[2]), tonumber(ARGV[3])
if score < base or score >= base + (tonumber(ARGV[4]) + 1) * slots then
  return 0
end
local started = math.floor((score - base) / slots)
local clock = tonumber(redis.call('GET', KEYS[1]) or 0)
if started <= clock then
  return 0
end
redis.call('SET', KEYS[1], started, 'EX', ARGV[5])
return 1
"""

# KEYS: queue, clock, owner. ARGV: base, slots, max round. The jobs a new job
# of `owner` would have ahead of it: every one of its round and those before.
_PLACE = """
local clock = tonumber(redis.call('GET', KEYS[2]) or 0)
local finish = tonumber(redis.call('GET', KEYS[3]) or 0)
local start = math.min(math.max(clock, finish), tonumber(ARGV[3]))
local low = tonumber(ARGV[1]) + start * tonumber(ARGV[2])
return redis.call('ZCOUNT', KEYS[1], '-inf', low + tonumber(ARGV[2]) - 1)
"""

# KEYS: queue, job, clock, owner. ARGV: job id, base, slots. A waiting job
# taken off; its owner gets its round back if the clock has not passed it.
_DROP_FAIR = """
local score = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
if not score then
  return 0
end
local round = math.floor((score - tonumber(ARGV[2])) / tonumber(ARGV[3]))
local clock = tonumber(redis.call('GET', KEYS[3]) or 0)
local finish = tonumber(redis.call('GET', KEYS[4]))
if finish and round >= clock and finish > clock then
  redis.call('SET', KEYS[4], finish - 1, 'KEEPTTL')
  return 1
end
return 0
"""


def fair_round(score: float) -> int | None:
    """The round of a fair score, or None for a score arq made (a time)."""
    if not FAIR_BASE <= score < FAIR_BASE + (MAX_ROUND + 1) * ROUND_SLOTS:
        return None
    return int(score - FAIR_BASE) // ROUND_SLOTS


# A retried fair job: arq's `incr_score` is the defer plus the time since its
# score (score + incr = when it is due again). The claim key, held till then,
# keeps workers off it; a job dropped meanwhile is left alone.
_DEFER_IN_PLACE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  redis.call('DEL', KEYS[2])
  return 0
end
local wait = math.floor(tonumber(score) + tonumber(ARGV[2]) - tonumber(ARGV[3]))
if wait < 1 then
  redis.call('DEL', KEYS[2])
  return 0
end
redis.call('SET', KEYS[2], 'deferred', 'PX', wait)
return wait
"""


class FairCall(TypedDict):
    """What `enqueue_tagged` and `queue_enqueue_tagged` take."""

    queue: str
    job_id: str
    job_key: str
    result_key: str
    data: bytes
    expires_ms: int
    owner: str
    previous_job_id: str | None


async def enqueue_tagged(redis: Redis, call: FairCall) -> float | None:
    """Store a job's data under `job_key` and add it to `queue` at its owner's
    fair place (or its previous attempt's), in one script; its score, or None
    when the job or its result exists already."""
    keys, args = _enqueue_fair_call(call)
    score = await redis.register_script(_ENQUEUE_FAIR)(keys=keys, args=args)
    return None if score is None else float(score)


# SHA-1 of the enqueue script, as EVALSHA names it.
ENQUEUE_FAIR_SHA = hashlib.sha1(
    _ENQUEUE_FAIR.encode(), usedforsecurity=False
).hexdigest()


def queue_enqueue_tagged(pipe: Pipeline, call: FairCall) -> None:
    """`enqueue_tagged`'s script as one command of the caller's pipeline, by
    its SHA only: its reply is the score, None, or NoScriptError while Redis
    has not seen the script (then call `enqueue_tagged`, which loads it).
    redis-py's own script-in-pipeline asks SCRIPT EXISTS first, a round trip
    more on every call."""
    keys, args = _enqueue_fair_call(call)
    pipe.execute_command("EVALSHA", ENQUEUE_FAIR_SHA, len(keys), *keys, *args)


def _enqueue_fair_call(
    call: FairCall,
) -> tuple[list[str], list[bytes | str | int | float]]:
    queue, job_id, owner = call["queue"], call["job_id"], call["owner"]
    previous_job_id = call["previous_job_id"]
    tag = fair_tag_key(job_id)
    return (
        [
            queue,
            call["job_key"],
            call["result_key"],
            fair_clock_key(queue),
            fair_owner_key(queue, owner),
            tag,
            fair_tag_key(previous_job_id) if previous_job_id else tag,
        ],
        [
            job_id,
            call["data"],
            call["expires_ms"],
            owner,
            FAIR_STATE_TTL_S,
            FAIR_BASE,
            ROUND_SLOTS,
            MAX_ROUND,
        ],
    )


async def places_ahead(redis: Redis, queue: str, owner: str) -> int:
    """How many jobs (running ones included) a job `owner` enqueued on the fair
    `queue` now would have ahead of it: its `queue_position` to be."""
    script = redis.register_script(_PLACE)
    ahead: int = await script(
        keys=[queue, fair_clock_key(queue), fair_owner_key(queue, owner)],
        args=[FAIR_BASE, ROUND_SLOTS, MAX_ROUND],
    )
    return ahead


_PLACE_SHA = hashlib.sha1(_PLACE.encode(), usedforsecurity=False).hexdigest()


def queue_places_ahead(pipe: Pipeline, queue: str, owner: str) -> None:
    """`places_ahead` as one command of the caller's pipeline, by its SHA (as
    `queue_enqueue_tagged`): give its reply to `places_ahead_reply`."""
    keys = [queue, fair_clock_key(queue), fair_owner_key(queue, owner)]
    pipe.execute_command(
        "EVALSHA", _PLACE_SHA, len(keys), *keys, FAIR_BASE, ROUND_SLOTS, MAX_ROUND
    )


async def places_ahead_reply(
    redis: Redis, reply: object, queue: str, owner: str
) -> int:
    """The places ahead from `queue_places_ahead`'s reply; asked again, with
    the script loaded, when Redis did not know it (NoScriptError)."""
    if isinstance(reply, NoScriptError):
        return await places_ahead(redis, queue, owner)
    if isinstance(reply, BaseException):
        raise reply
    return int(cast(int, reply))


async def advance_clock(redis: Redis, queue: str, score: float) -> bool:
    """Move a fair queue's virtual time to the round of a job that starts
    (never back); False when it was there already or the score is not fair."""
    script = redis.register_script(_ADVANCE_CLOCK)
    moved = await script(
        keys=[fair_clock_key(queue)],
        args=[int(score), FAIR_BASE, ROUND_SLOTS, MAX_ROUND, FAIR_STATE_TTL_S],
    )
    return bool(moved)


async def defer_in_place(
    redis: Redis, queue: str, claim_key: str, job_id: str, incr_score: int, now_ms: int
) -> None:
    """A retried fair job keeps its score; its claim key, held for the defer,
    keeps every worker off it until then."""
    script = redis.register_script(_DEFER_IN_PLACE)
    await script(keys=[queue, claim_key], args=[job_id, incr_score, now_ms])


async def drop_fair(redis: Redis, queue: str, job_key: str, job_id: str) -> bool:
    """Take a waiting fair job off `queue`, giving its owner the round back;
    False when it is not a fair job (nothing done)."""
    owner: bytes | None = await cast(
        Awaitable[bytes | None], redis.hget(fair_tag_key(job_id), "owner")
    )
    if owner is None:
        return False
    script = redis.register_script(_DROP_FAIR)
    await script(
        keys=[
            queue,
            job_key,
            fair_clock_key(queue),
            fair_owner_key(queue, owner.decode()),
        ],
        args=[job_id, FAIR_BASE, ROUND_SLOTS],
    )
    return True

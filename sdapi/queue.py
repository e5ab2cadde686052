"""Our small layer over arq: msgpack (never pickle), pools, enqueue, lookups.

arq is in maintenance mode upstream; everything else goes through here so it
can be replaced without touching callers.
"""

from __future__ import annotations

import contextlib
from typing import Any
from uuid import UUID

import msgpack
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.retry import Retry as RedisRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpu_node.schemas import (
    BATCH_FUNCTION,
    CANCEL_CHANNEL,
    CANCEL_TTL_S,
    GENERATE_FUNCTION,
    BatchJob,
    GenerationJob,
    batch_job_id,
    batch_queue,
    cancel_key,
    generation_job_id,
    premium_queue,
    wake_channel,
)


def _fallback(obj: object) -> object:
    # arq stores a failed job's exception as its result; keep its text only.
    if isinstance(obj, BaseException):
        return f"{type(obj).__name__}: {obj}"
    if isinstance(obj, UUID):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def serialize(obj: Any) -> bytes:
    """arq job serializer: msgpack, so nothing in Redis can run code on a worker."""
    data: bytes = msgpack.packb(obj, use_bin_type=True, default=_fallback)
    return data


def deserialize(data: bytes) -> Any:
    """arq job deserializer matching `serialize`."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def redis_settings(url: str) -> RedisSettings:
    """arq connection settings for a redis:// URL that ride out a Redis restart."""
    settings = RedisSettings.from_dsn(url)
    settings.conn_retries = 30
    settings.conn_retry_delay = 1
    settings.retry_on_timeout = True
    # Each command retries with backoff for about 10 s before it fails, so a
    # restart of Redis looks like a slow command, not an error.
    settings.retry = RedisRetry(ExponentialBackoff(cap=2.0, base=0.1), retries=8)
    settings.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
    return settings


async def create_queue_pool(
    url: str, *, max_connections: int | None = None
) -> ArqRedis:
    """An arq pool (a redis.asyncio client with `enqueue_job`) using msgpack.

    With `max_connections`, a command that finds them all busy fails at once
    instead of opening another connection.
    """
    settings = redis_settings(url)
    settings.max_connections = max_connections
    pool: ArqRedis = await create_pool(
        settings, job_serializer=serialize, job_deserializer=deserialize
    )
    return pool


async def _wake(pool: ArqRedis, queue: str) -> None:
    # Best effort: a node that misses it still finds the job at its next poll.
    with contextlib.suppress(RedisError, OSError):
        await pool.publish(wake_channel(queue), b"")


async def enqueue(
    pool: ArqRedis,
    function: str,
    payload: BaseModel,
    *,
    queue: str,
    job_id: str,
    defer_s: float | None = None,
) -> bool:
    """Enqueue `function(payload)` and wake `queue`'s workers.

    False when a job with `job_id` already exists. arq 0.28 has no per-job
    timeout: consumers derive theirs from the payload (the GPU node applies
    `gpu_node.schemas.job_timeout_s`).
    """
    job = await pool.enqueue_job(
        function,
        payload.model_dump(mode="json"),
        _job_id=job_id,
        _queue_name=queue,
        _defer_by=defer_s,
    )
    if job is None:
        return False
    if defer_s is None:
        await _wake(pool, queue)
    return True


async def enqueue_generation(pool: ArqRedis, job: GenerationJob) -> bool:
    """Put one premium generation on its model's premium queue."""
    return await enqueue(
        pool,
        GENERATE_FUNCTION,
        job,
        queue=premium_queue(job.model),
        job_id=generation_job_id(job.generation_id, job.attempt),
    )


async def enqueue_batch(pool: ArqRedis, batch: BatchJob) -> bool:
    """Put a normal-tier batch on its model's batch queue."""
    return await enqueue(
        pool,
        BATCH_FUNCTION,
        batch,
        queue=batch_queue(batch.model),
        job_id=batch_job_id(batch.batch_id, batch.attempt),
    )


async def request_cancel(pool: Redis, generation_id: UUID | str) -> None:
    """Raise a generation's cancel flag and tell the nodes at once."""
    await pool.set(cancel_key(generation_id), b"1", ex=CANCEL_TTL_S)
    with contextlib.suppress(RedisError, OSError):
        await pool.publish(CANCEL_CHANNEL, str(generation_id).encode())


async def queue_position(pool: ArqRedis, queue: str, job_id: str) -> int | None:
    """0-based place of a job in its queue, or None once it left the queue."""
    rank: int | None = await pool.zrank(queue, job_id)
    return rank


async def queue_depth(pool: ArqRedis, queue: str) -> int:
    """Jobs waiting or running on `queue` (arq keeps running jobs in the set)."""
    depth: int = await pool.zcard(queue)
    return depth


async def job_is_live(pool: ArqRedis, job_id: str) -> bool:
    """Whether the job is still queued or running (a kept result does not count)."""
    count: int = await pool.exists(
        job_key_prefix + job_id, in_progress_key_prefix + job_id
    )
    return count > 0


async def job_is_running(pool: ArqRedis, job_id: str) -> bool:
    """Whether a worker has taken the job and runs it now."""
    count: int = await pool.exists(in_progress_key_prefix + job_id)
    return count > 0


async def drop_waiting_job(pool: ArqRedis, queue: str, job_id: str) -> None:
    """Take a job nobody runs off its queue (a worker that takes it meanwhile
    finds it gone and drops it)."""
    async with pool.pipeline(transaction=True) as pipe:
        pipe.zrem(queue, job_id)
        pipe.delete(job_key_prefix + job_id)
        await pipe.execute()

"""A task cancelled while it sends a Redis command stops
(sdapi/infra/redis_writes.py)."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from sdapi.infra.queue import create_queue_pool

TRIALS = 300


async def _commands(redis: Redis) -> None:
    while True:
        await redis.hmget("sdapi-test:hash", ["a", "b"])


async def test_a_request_pools_command_never_loses_a_cancellation(
    clean_redis: str,
) -> None:
    # On Python 3.11 redis-py's own write lost about 2 in 5 of these.
    pool = await create_queue_pool(clean_redis, deadline_s=5.0)
    try:
        for trial in range(TRIALS):
            task = asyncio.create_task(_commands(pool))
            # Cancelled at a different point of its commands each time.
            for _ in range(trial % 29 + 1):
                await asyncio.sleep(0)
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=2.0)
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            assert done, f"trial {trial}: the cancelled task ran on"
            assert task.cancelled()
    finally:
        await pool.aclose()


async def test_every_connection_of_a_request_pool_has_the_deadline(
    clean_redis: str,
) -> None:
    pool = await create_queue_pool(clean_redis, deadline_s=2.5)
    try:
        # Two connections at once: the one arq opened to ping is not reused
        # without the deadline.
        await asyncio.gather(pool.ping(), pool.execute_command("CLIENT", "ID"))
        connection = await pool.connection_pool.get_connection()
        try:
            assert connection.socket_timeout == 2.5
            assert type(connection).__name__.startswith("DeadlineWrites")
        finally:
            await pool.connection_pool.release(connection)
    finally:
        await pool.aclose()

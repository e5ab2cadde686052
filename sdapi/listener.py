"""Pub/sub hints that save a poll: new work on a queue, a cancelled generation.

They are only hints: the queue and the cancel flag in Redis stay the truth
and are still polled, so a message lost while Redis restarts costs only the
latency it would have saved.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from arq.typing import StartupShutdown
from arq.worker import Worker
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

Handler = Callable[[bytes], None]

# Wait between attempts to (re)subscribe while Redis is away, in seconds.
RESUBSCRIBE_DELAY_S = 1.0


class Listener:
    """One subscription to `handlers`' channels, kept alive across Redis restarts."""

    def __init__(self, redis_client: Redis, handlers: Mapping[str, Handler]) -> None:
        self._redis = redis_client
        self._handlers = dict(handlers)
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        """Dispatch messages until cancelled."""
        while True:
            try:
                await self._listen()
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("pub/sub lost (%s); resubscribing", exc)
                await asyncio.sleep(RESUBSCRIBE_DELAY_S)

    async def _listen(self) -> None:
        async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(*self._handlers)
            self.subscribed.set()
            async for message in pubsub.listen():
                channel = message["channel"]
                name = channel.decode() if isinstance(channel, bytes) else str(channel)
                handler = self._handlers.get(name)
                if handler is None:
                    continue
                data = message["data"]
                try:
                    handler(data if isinstance(data, bytes) else str(data).encode())
                except Exception:
                    # One bad message (say, not UTF-8) must not end the
                    # subscription: later hints would be lost without a trace.
                    log.exception("pub/sub handler for %s failed", name)


def setter(event: asyncio.Event) -> Handler:
    """A handler that sets `event` whatever the message says."""
    return lambda _data: event.set()


async def poll_when_woken(worker: Worker, woken: asyncio.Event) -> None:
    """Run an extra poll of `worker`'s queue each time `woken` is set.

    A producer published new work: claim it now rather than at the worker's
    next poll. arq 0.28's poll iteration claims a job atomically (WATCH/MULTI
    on its in-progress key), so one beside the worker's own loop cannot start
    a job twice.
    """
    while True:
        await woken.wait()
        woken.clear()
        # Woken as a job ends (`wake_after_job`), arq frees its slot in a
        # callback that runs right after: give it a turn or two of the loop.
        for _ in range(3):
            if worker.job_counter < worker.max_jobs:
                break
            await asyncio.sleep(0)
        if not worker.allow_pick_jobs or worker.job_counter >= worker.max_jobs:
            continue
        try:
            await worker._poll_iteration()
        except (RedisError, OSError) as exc:
            log.debug("wake-up poll of %s failed: %s", worker.queue_name, exc)


def wake_after_job(woken: asyncio.Event) -> StartupShutdown:
    """An arq `after_job_end` hook: look for the next job as soon as one ends.

    A worker that takes one job at a time ignores wake-ups while busy; without
    this, work that arrived meanwhile would wait for the next poll.
    """

    async def after_job_end(ctx: dict[str, Any]) -> None:
        woken.set()

    return after_job_end

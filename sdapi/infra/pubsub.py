"""Pub/sub hints that save a poll: new work on a queue, a cancelled generation.

They are only hints: the queue and the cancel flag in Redis stay the truth
and are still polled, so a message lost while Redis restarts costs only the
latency it would have saved.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

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
        # How many times it (re)subscribed: a change means messages may have
        # been lost in between (a cache kept true by them must start over).
        self.subscriptions = 0

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
            self.subscriptions += 1
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

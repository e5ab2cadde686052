"""Which job each claim took, and in what order, read from Valkey itself.

Keyspace notifications come in the order the server ran the commands: the
order in which competing workers' claims (arq's PSETEX of a job's claim key)
and the test's own enqueues (ZADD) happened, with no clock involved.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

import redis.asyncio
from arq.constants import in_progress_key_prefix

from tests.support import until


class KeyEvents:
    """Valkey's keyspace notifications of one database, in the order the
    server ran the commands: which job each claim took, and when, among the
    test's own writes, without timing anything.

    Notifications are a server setting: on for the block, off after.
    """

    def __init__(self, url: str) -> None:
        self._client = redis.asyncio.Redis.from_url(url)
        self._db = int(self._client.connection_pool.connection_kwargs.get("db", 0))
        self._pubsub = self._client.pubsub()
        self._reader: asyncio.Task[None] | None = None
        self.seen: list[tuple[str, str]] = []
        self._subscribed = asyncio.Event()

    async def __aenter__(self) -> KeyEvents:
        # K: keyspace events; $: string commands (arq claims with PSETEX);
        # z: sorted sets (an enqueue's ZADD).
        await self._client.config_set("notify-keyspace-events", "K$z")
        await self._pubsub.psubscribe(f"__keyspace@{self._db}__:*")
        self._reader = asyncio.create_task(self._read())
        await until(self._subscribed.is_set, 10, "the keyspace subscription")
        return self

    async def _read(self) -> None:
        prefix = f"__keyspace@{self._db}__:"
        async for message in self._pubsub.listen():
            if message["type"] == "psubscribe":
                self._subscribed.set()
            elif message["type"] == "pmessage":
                key = message["channel"].decode().removeprefix(prefix)
                self.seen.append((key, message["data"].decode()))

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.config_set("notify-keyspace-events", "")
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._pubsub.aclose()
        await self._client.aclose()

    def claims(self, job_ids: list[str] | None = None) -> list[str]:
        """Job ids in the order they were first claimed (of `job_ids`, if given)."""
        return [
            job_id
            for job_id in KeyEvents._first_claims(self.seen)
            if job_ids is None or job_id in job_ids
        ]

    def claims_after(
        self, queue: str, adds: int, job_ids: list[str] | None = None
    ) -> list[str]:
        """Jobs first claimed after the `adds`-th ZADD to `queue` (of `job_ids`,
        if given: other queues' claims, `jobs`' own tasks, come in between)."""
        count = 0
        for n, (key, event) in enumerate(self.seen):
            if key == queue and event == "zadd":
                count += 1
                if count == adds:
                    earlier = set(KeyEvents._first_claims(self.seen[:n]))
                    return [
                        job_id
                        for job_id in KeyEvents._first_claims(self.seen[n:])
                        if job_id not in earlier
                        and (job_ids is None or job_id in job_ids)
                    ]
        raise AssertionError(f"fewer than {adds} jobs were added to {queue}")

    @staticmethod
    def _first_claims(seen: list[tuple[str, str]]) -> list[str]:
        claimed: list[str] = []
        for key, event in seen:
            if event == "set" and key.startswith(in_progress_key_prefix):
                job_id = key.removeprefix(in_progress_key_prefix)
                if job_id not in claimed:
                    claimed.append(job_id)
        return claimed

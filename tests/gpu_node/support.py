"""Helpers for the GPU node tests: jobs, results and events as the node leaves them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import redis.asyncio
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import deserialize_job

from sdapi.contract.events import Event
from sdapi.contract.names import result_job_id, started_job_id
from sdapi.contract.payloads import (
    GenerationJob,
    GenerationParams,
    GenerationResult,
    StartedNotice,
)
from sdapi.contract.status import Tier
from sdapi.infra.queue import deserialize
from sdapi.infra.streams import read_events
from tests.support import until

REPO = Path(__file__).resolve().parents[2]


def params(**changes: Any) -> GenerationParams:
    """Small, fast generation parameters for the tiny model."""
    values: dict[str, Any] = {
        "prompt": "a red fox in the snow",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 64,
        "steps": 4,
        "guidance_scale": 7.5,
        "seed": 1234,
        "num_images": 1,
        "scheduler": "euler_a",
    }
    values.update(changes)
    return GenerationParams(**values)


def job(
    tier: Tier = Tier.PREMIUM, model: str = "tiny", attempt: int = 1, **changes: Any
) -> GenerationJob:
    """A generation job with a fresh id."""
    return GenerationJob(
        generation_id=uuid.uuid4(),
        model=model,
        tier=tier,
        params=params(**changes),
        attempt=attempt,
    )


async def queued_payload(client: redis.asyncio.Redis, job_id: str) -> Any | None:
    """The first argument of a queued arq job, or None if it is not there."""
    raw = await client.get(job_key_prefix + job_id)
    if raw is None:
        return None
    return deserialize_job(raw, deserializer=deserialize).args[0]


async def result_of(
    client: redis.asyncio.Redis,
    generation_id: Any,
    attempt: int = 1,
    timeout: float = 90.0,
) -> GenerationResult:
    """The GenerationResult the node enqueued for `store_result`."""

    async def check() -> Any:
        return await queued_payload(client, result_job_id(generation_id, attempt))

    payload = await until(check, timeout)
    return GenerationResult.model_validate(payload)


async def started_notice(
    client: redis.asyncio.Redis, generation_id: Any, attempt: int = 1
) -> StartedNotice | None:
    """The StartedNotice the node enqueued for `mark_started`, if any."""
    payload = await queued_payload(client, started_job_id(generation_id, attempt))
    return None if payload is None else StartedNotice.model_validate(payload)


async def events_of(
    client: redis.asyncio.Redis, generation_id: Any
) -> list[tuple[str, Event]]:
    """Every event of a generation's stream, from the start."""
    return await read_events(client, generation_id)


def stream_ms(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable (milliseconds, sequence) pair."""
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq)


def start_node_process(
    log_path: Path,
    *,
    redis_url: str,
    models_dir: Path,
    node_id: str,
    **env: str,
) -> subprocess.Popen[bytes]:
    """`sdapi gpu-node` as its own process on the CPU, without Consul, serving
    `tiny` unless `env` says otherwise; its output goes to `log_path`."""
    full = {
        **os.environ,
        "SDAPI_MODEL": "tiny",
        "SDAPI_MODEL_DIR": str(models_dir),
        "SDAPI_REDIS_URL": redis_url,
        "SDAPI_NODE_ID": node_id,
        "SDAPI_GPU_DEVICE": "cpu",
        "SDAPI_CONSUL_URL": "",
        **env,
    }
    with log_path.open("w") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "sdapi", "gpu-node"],
            env=full,
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


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

    def claims_after(self, queue: str, adds: int) -> list[str]:
        """Jobs first claimed after the `adds`-th ZADD to `queue`."""
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

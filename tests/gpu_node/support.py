"""Helpers for the GPU node tests: jobs, results and events as the node leaves them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio
from arq.constants import job_key_prefix
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

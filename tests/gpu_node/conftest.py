"""Fixtures for the GPU node: one tiny model per run, a node per test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio

from gpu_node.calls import Engine
from gpu_node.settings import GpuNodeSettings


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder holding the tiny model, built once per test run."""
    from gpu_node import tiny, weights

    folder = tmp_path_factory.mktemp("models")
    tiny.prepare_model(weights.locate_model("tiny", folder))
    return folder


@pytest.fixture(scope="session")
def tiny_engine(models_dir: Path) -> Engine:
    """The tiny model loaded once, shared by the in-process nodes."""
    from gpu_node import pipeline, weights

    return pipeline.load_engine(weights.locate_model("tiny", models_dir), device="cpu")


def node_settings(models_dir: Path, redis_url: str, **changes: Any) -> GpuNodeSettings:
    """Settings of a quick node for tests."""
    values: dict[str, Any] = {
        "model": "tiny",
        "model_dir": models_dir,
        "redis_url": redis_url,
        "node_id": "test-node",
        "gpu_device": "cpu",
        "gpu_health_port": 0,
        "gpu_premium_poll_s": 0.01,
        "gpu_batch_poll_s": 0.02,
        "gpu_announce_every_s": 0.5,
        "gpu_preview_every": 2,
        # Every step, so tests can count them.
        "gpu_progress_interval_s": 0,
        "gpu_drain_grace_s": 10,
        "gpu_max_batch": 4,
        "consul_url": None,
    }
    values.update(changes)
    return GpuNodeSettings.from_env(**values)


@contextlib.asynccontextmanager
async def running_node(
    settings: GpuNodeSettings, redis_url: str, engine: Engine
) -> AsyncIterator[Any]:
    """A started node serving in the background; drained and closed after."""
    from gpu_node.node import GpuNode

    node = GpuNode(settings, redis_url, engine=engine)
    await node.start()
    serving = asyncio.create_task(node.serve())
    try:
        yield node
    finally:
        node.request_stop()
        await serving
        await node.close()


@pytest.fixture
async def node(
    models_dir: Path, clean_redis: str, tiny_engine: Engine
) -> AsyncIterator[Any]:
    """A node on the test Redis with the shared tiny engine."""
    async with running_node(
        node_settings(models_dir, clean_redis), clean_redis, tiny_engine
    ) as n:
        yield n


@pytest.fixture
async def client(clean_redis: str) -> AsyncIterator[redis.asyncio.Redis]:
    """An arq pool on the test Redis (producers enqueue through one)."""
    from sdapi.infra.queue import create_queue_pool

    conn = await create_queue_pool(clean_redis)
    try:
        yield conn
    finally:
        await conn.aclose()

"""Estimated times against real runs: a node on the tiny model learns its
speed while it serves a steady stream through the web app, and the estimate
each request gets at submit time is compared with when it really ended."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from gpu_node.calls import Engine
from sdapi.contract.events import EVENT_ADAPTER, EVENT_FIELD, ImageEvent, StartedEvent
from sdapi.contract.names import events_key, speed_key
from sdapi.devtools.accounts import auth, make_user
from sdapi.infra.queue import QueuePool
from sdapi.infra.streams import read_events
from tests.gpu_node.conftest import node_settings, running_node
from tests.gpu_node.support import stream_ms
from tests.support import until
from web.app import create_app
from web.appkeys import redis_key
from web.settings import WebSettings

GENERATIONS = "/api/v1/generations"
# Steps enough that a run is not dominated by noise (a fraction of a second
# on the tiny model), few enough that the stream fits well under a minute.
REQUEST = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 25}
LEARN_RUNS = 3
STREAM_RUNS = 15
# The share of estimates that must land within +-50% of the real time.
WITHIN = 0.8


async def finished_at(redis: QueuePool, ident: str) -> float | None:
    """When the node delivered a generation's image (Redis's clock, this
    machine's), or None before. Only the stream's last entry is read: a whole
    stream of progress events, read again and again, would take the CPU from
    the node it measures."""
    last = await redis.xrevrange(events_key(ident), count=1)
    if not last:
        return None
    entry_id, fields = last[0]
    event = EVENT_ADAPTER.validate_json(fields[EVENT_FIELD.encode()])
    if not isinstance(event, ImageEvent):
        return None
    millis, _ = stream_ms(entry_id.decode())
    return millis / 1000


async def submit(client: TestClient, secret: str, **change: Any) -> dict[str, Any]:
    response = await client.post(
        GENERATIONS, json={**REQUEST, **change}, headers=auth(secret)
    )
    assert response.status == 202, await response.text()
    view: dict[str, Any] = await response.json()
    return view


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch's default of a thread per core spins against the web app and the
    test on the same cores: a run then takes many times as long, and varies."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
async def web_client(
    aiohttp_client: Callable[..., Any], clean_db: str, clean_redis: str, tmp_path: Path
) -> TestClient:
    """The web app on the node's Redis; nothing stores results (no `jobs`),
    so the in-flight limit is lifted."""
    settings = WebSettings(
        database_url=clean_db,
        redis_url=clean_redis,
        data_dir=tmp_path,
        secret_key=SecretStr("test-secret-key"),
        bcrypt_rounds=4,
        public_url="http://testserver.local",
        premium_max_in_flight=100,
    )
    client: TestClient = await aiohttp_client(create_app(settings))
    return client


async def test_estimates_at_submit_land_near_the_real_finish(
    web_client: TestClient,
    models_dir: Path,
    clean_redis: str,
    tiny_engine: Engine,
    one_torch_thread: None,
) -> None:
    redis = web_client.app[redis_key]
    settings = node_settings(
        models_dir,
        clean_redis,
        node_id="eta-node",
        gpu_progress_interval_s=0.2,
        gpu_preview_every=0,
    )
    async with running_node(settings, clean_redis, tiny_engine):
        _, secret = await make_user()
        # Nothing learned yet: said, not invented.
        first = await submit(web_client, secret)
        assert first["eta_s"] is None
        await until(lambda: finished_at(redis, first["id"]), 60, "the first run")
        # The node learns from a few runs one after the other.
        for _ in range(LEARN_RUNS - 1):
            ident = (await submit(web_client, secret))["id"]
            await until(lambda i=ident: finished_at(redis, i), 60, "a learning run")
        assert await redis.hlen(speed_key("tiny")) >= 1
        # A steady stream: between one and three generations in flight, so an
        # estimate counts work ahead, a running job, or none.
        given: dict[str, tuple[float, float]] = {}
        for n in range(STREAM_RUNS):

            async def room(limit: int = 1 + n % 3) -> bool:
                ends = [await finished_at(redis, ident) for ident in given]
                return sum(end is None for end in ends) < limit

            await until(room, 60, "room in the stream")
            view = await submit(web_client, secret)
            assert view["eta_s"] is not None, view
            assert view["eta_s"] == pytest.approx(
                view["eta"]["wait_s"] + view["eta"]["run_s"], abs=0.11
            )
            given[view["id"]] = (time.time(), view["eta_s"])
        errors = []
        for ident, (submitted, eta_s) in given.items():
            end = await until(lambda i=ident: finished_at(redis, i), 60, "the end")
            errors.append((eta_s - (end - submitted)) / (end - submitted))
        # The node's `started` frames carry its own estimate of the run.
        started = [
            event
            for _, event in await read_events(redis, next(iter(given)))
            if isinstance(event, StartedEvent)
        ]
        assert started[0].eta_s is not None
    within = sum(abs(error) <= 0.5 for error in errors)
    assert within >= WITHIN * len(errors), str([round(error, 2) for error in errors])

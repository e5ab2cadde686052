"""A node serving a catalogue: several models, loaded within a budget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import redis.asyncio

from gpu_node.calls import Engine
from sdapi.contract.events import LoadingModelEvent, StartedEvent
from sdapi.contract.names import GENERATE_FUNCTION, generation_job_id, premium_queue
from sdapi.contract.payloads import BatchJob
from sdapi.contract.status import Status, Tier
from sdapi.infra.announcements import live_nodes
from sdapi.infra.queue import QueuePool, enqueue_batch, enqueue_generation
from tests.gpu_node.conftest import node_settings, running_node
from tests.gpu_node.support import events_of, job, result_of


async def _metric(url: str, line_start: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_node_with_two_models_serves_both(
    models_dir: Path,
    clean_redis: str,
    tiny_engine: Engine,
    client: redis.asyncio.Redis,
) -> None:
    settings = node_settings(models_dir, clean_redis, models="tiny,other=tiny")
    async with running_node(settings, clean_redis, tiny_engine):
        announced = {info.model: info for info in await live_nodes(client)}
        assert sorted(announced) == ["other", "tiny"]
        assert all(i.loaded and i.kind == "sd1" for i in announced.values())
        jobs = [job(model="tiny"), job(model="other"), job(Tier.NORMAL, "other")]
        for one in jobs:
            await enqueue_generation(client, one, owner="test")
        results = [await result_of(client, one.generation_id) for one in jobs]
    assert [r.status for r in results] == [Status.SUCCEEDED] * 3
    assert [r.model for r in results] == ["tiny", "other", "other"]


async def test_a_budget_of_one_model_finishes_queued_work_before_switching(
    models_dir: Path,
    clean_redis: str,
    tiny_engine: Engine,
    client: redis.asyncio.Redis,
) -> None:
    settings = node_settings(
        models_dir,
        clean_redis,
        models="tiny,other=tiny",
        gpu_ram_budget_bytes=0,
        gpu_cold_claim_delay_s=0,
        gpu_switch_after_s=60,
    )
    async with running_node(settings, clean_redis, tiny_engine) as node:
        announced = {info.model: info.loaded for info in await live_nodes(client)}
        assert announced == {"tiny": True, "other": False}
        metrics_url = node.info.health_url.replace("/healthz", "/metrics")
        alternating = [job(model=m) for m in ("tiny", "other") * 3]
        for one in alternating:
            await enqueue_generation(client, one, owner="test")
        results = await asyncio.gather(
            *(result_of(client, one.generation_id) for one in alternating)
        )
        loads = {
            model: await _metric(
                metrics_url, f'sdapi_gpu_model_loads_total{{model="{model}"}}'
            )
            for model in ("tiny", "other")
        }
    assert [r.status for r in results] == [Status.SUCCEEDED] * 6
    assert [r.model for r in results] == ["tiny", "other"] * 3
    # `tiny` came loaded: its three jobs ran, then `other` loaded once.
    assert loads == {"tiny": 0.0, "other": 1.0}
    finished = sorted(results, key=lambda r: r.finished_at)
    assert [r.model for r in finished] == ["tiny"] * 3 + ["other"] * 3


async def test_a_job_waiting_for_its_cold_model_gets_a_loading_model_event(
    models_dir: Path,
    clean_redis: str,
    tiny_engine: Engine,
    client: redis.asyncio.Redis,
) -> None:
    settings = node_settings(
        models_dir,
        clean_redis,
        models="tiny,other=tiny",
        gpu_ram_budget_bytes=0,
        gpu_cold_claim_delay_s=0,
    )
    async with running_node(settings, clean_redis, tiny_engine):
        warm, cold = job(model="tiny"), job(model="other")
        for one in (warm, cold):
            await enqueue_generation(client, one, owner="test")
            assert (await result_of(client, one.generation_id)).status is (
                Status.SUCCEEDED
            )
        warm_events = [e for _, e in await events_of(client, warm.generation_id)]
        cold_events = [e for _, e in await events_of(client, cold.generation_id)]
    assert not any(isinstance(e, LoadingModelEvent) for e in warm_events)
    warm_started = next(e for e in warm_events if isinstance(e, StartedEvent))
    assert warm_started.load_s is None
    types = [e.type for e in cold_events]
    assert types.index("loading_model") < types.index("started")
    assert LoadingModelEvent(model="other") in cold_events
    cold_started = next(e for e in cold_events if isinstance(e, StartedEvent))
    assert cold_started.load_s is not None and cold_started.load_s >= 0


async def test_a_waiting_premium_job_of_one_model_starts_before_a_batch_of_another(
    models_dir: Path,
    clean_redis: str,
    tiny_engine: Engine,
    client: QueuePool,
) -> None:
    settings = node_settings(
        models_dir,
        clean_redis,
        models="tiny,other=tiny",
        # Premium polls seldom and is not woken below: a batch woken at once
        # would be claimed long before it, but for the gate.
        gpu_premium_poll_s=3,
    )
    async with running_node(settings, clean_redis, tiny_engine):
        premium = job(model="tiny")
        await client.enqueue_job(
            GENERATE_FUNCTION,
            premium.model_dump(mode="json"),
            _job_id=generation_job_id(premium.generation_id, premium.attempt),
            _queue_name=premium_queue("tiny"),
        )
        item = job(Tier.NORMAL, "other")
        await enqueue_batch(
            client, BatchJob(batch_id=item.generation_id, model="other", items=[item])
        )
        done = [await result_of(client, one.generation_id) for one in (premium, item)]
    assert [r.status for r in done] == [Status.SUCCEEDED] * 2
    # Claimed first, the premium job runs ahead of the batch (which may start
    # beside it, yielding the device at each step).
    assert done[0].finished_at <= done[1].finished_at

"""The node process: announcements, health, metrics, SIGTERM drain, Redis restarts."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from arq.constants import in_progress_key_prefix

from gpu_node.calls import Engine
from gpu_node.settings import GpuNodeSettings
from sdapi.contract.names import generation_job_id, node_key
from sdapi.contract.nodes import NodeInfo
from sdapi.contract.status import Status
from sdapi.devtools.embedded import EmbeddedValkey
from sdapi.infra.queue import create_queue_pool, enqueue_generation
from sdapi.infra.settings import SettingsError
from tests.gpu_node.conftest import node_settings, running_node
from tests.gpu_node.support import (
    events_of,
    job,
    queued_payload,
    result_of,
    start_node_process,
)
from tests.key_events import KeyEvents
from tests.support import until

REPO = Path(__file__).resolve().parents[2]


async def test_node_announces_itself_in_redis(
    node: Any, client: redis.asyncio.Redis
) -> None:
    raw = await client.get(node_key("test-node"))
    assert raw is not None
    info = NodeInfo.model_validate_json(raw)
    assert info == node.info
    assert (info.model, info.device, info.max_batch, info.pipeline) == (
        "tiny",
        "cpu",
        4,
        "sd",
    )
    assert (info.default_width, info.max_width, info.default_steps) == (256, 512, 20)
    assert {"euler", "euler_a", "dpmpp_2m", "ddim", "unipc", "pndm"} <= set(
        info.schedulers
    )
    assert 0 < await client.ttl(node_key("test-node")) <= 15
    assert NodeInfo.from_meta(info.to_meta()) == info


async def test_node_key_is_deleted_on_shutdown(
    models_dir: Path, clean_redis: str, tiny_engine: Engine, client: redis.asyncio.Redis
) -> None:
    settings = node_settings(models_dir, clean_redis, node_id="short-lived")
    async with running_node(settings, clean_redis, tiny_engine):
        assert await client.exists(node_key("short-lived"))
    assert not await client.exists(node_key("short-lived"))


async def test_healthz_and_metrics(node: Any, client: redis.asyncio.Redis) -> None:
    request = job(steps=3)
    await enqueue_generation(client, request, owner="test")
    await result_of(client, request.generation_id)
    async with aiohttp.ClientSession() as http:
        async with http.get(node.info.health_url) as response:
            assert response.status == 200
            health = await response.json()
        metrics_url = node.info.health_url.replace("/healthz", "/metrics")
        async with http.get(metrics_url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = await response.text()
    assert health["status"] == "ok" and health["model_loaded"] is True
    assert health["model"] == "tiny" and health["device"] == "cpu"
    assert 'sdapi_gpu_model_loaded{model="tiny"} 1.0' in text
    assert 'sdapi_gpu_generations_total{status="succeeded",tier="premium"} 1.0' in text
    assert 'sdapi_gpu_images_total{tier="premium"} 1.0' in text
    assert "sdapi_gpu_steps_total 3.0" in text
    assert 'sdapi_gpu_queue_wait_seconds_count{tier="premium"} 1.0' in text
    assert (
        "sdapi_gpu_steps_per_second " in text and "sdapi_gpu_images_per_second " in text
    )


def test_bad_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDAPI_GPU_MAX_BATCH", "0")
    with pytest.raises(SettingsError, match=r"^bad setting SDAPI_GPU_MAX_BATCH='0': "):
        GpuNodeSettings.from_env()
    monkeypatch.setenv("SDAPI_GPU_MAX_BATCH", "2")
    monkeypatch.setenv("SDAPI_GPU_DEVICE", "tpu")
    with pytest.raises(SettingsError, match="SDAPI_GPU_DEVICE"):
        GpuNodeSettings.from_env()


async def test_node_survives_a_redis_restart(
    tmp_path: Path,
    models_dir: Path,
    tiny_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = EmbeddedValkey(tmp_path / "valkey")
    server.start()
    try:
        settings = node_settings(models_dir, server.url, node_id="restart-node")
        async with running_node(settings, server.url, tiny_engine):
            pool = await create_queue_pool(server.url)
            try:
                before = job(steps=2)
                await enqueue_generation(pool, before, owner="test")
                assert (
                    await result_of(pool, before.generation_id)
                ).status is Status.SUCCEEDED
            finally:
                await pool.aclose()

            server.stop()

            async def outage_noticed() -> bool:
                return any(
                    "Redis unavailable" in record.getMessage()
                    for record in caplog.records
                )

            await until(outage_noticed, 30)
            server.start()

            pool = await create_queue_pool(server.url)
            try:
                after = job(steps=2)
                await enqueue_generation(pool, after, owner="test")
                result = await result_of(pool, after.generation_id, timeout=30)
                assert result.status is Status.SUCCEEDED
                # The announcement comes back too (the restart lost every key).
                await until(lambda: pool.exists(node_key("restart-node")), 10)
            finally:
                await pool.aclose()
    finally:
        server.stop()


@pytest.mark.slow
async def test_sigterm_drains_the_running_job(
    tmp_path: Path, models_dir: Path, clean_redis: str, client: redis.asyncio.Redis
) -> None:
    log_path = tmp_path / "node.log"
    process = start_node_process(
        log_path,
        redis_url=clean_redis,
        models_dir=models_dir,
        node_id="drain-node",
        SDAPI_GPU_HEALTH_PORT="0",
    )
    try:
        await until(lambda: client.exists(node_key("drain-node")), 120)
        running = job(steps=30)
        await enqueue_generation(client, running, owner="test")

        async def started() -> bool:
            return len(await events_of(client, running.generation_id)) >= 3

        await until(started, 30)
        process.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            return "draining:" in log_path.read_text()

        await until(draining, 30)
        late = job(steps=2)
        await enqueue_generation(client, late, owner="test")
        await asyncio.to_thread(process.wait, 60)
        assert process.returncode == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    stderr = log_path.read_text()
    assert "gpu node drain-node: model tiny" in stderr
    assert "draining: 1 job(s) running" in stderr
    assert "health http://127.0.0.1:" in stderr
    # The running job finished and was handed over; the late one was not taken.
    result = await result_of(client, running.generation_id, timeout=1)
    assert result.status is Status.SUCCEEDED and len(result.images) == 1
    assert await events_of(client, late.generation_id) == []
    assert await queued_payload(client, str(late.generation_id)) is not None
    assert not await client.exists(node_key("drain-node"))


@pytest.mark.slow
async def test_a_sigkilled_nodes_job_is_picked_up_after_its_lease(
    tmp_path: Path,
    models_dir: Path,
    clean_redis: str,
    client: redis.asyncio.Redis,
    tiny_engine: Engine,
) -> None:
    """Claimed again after the dead node's lease, first in line: fair order
    survives the kill (A1 A2 B1 C1 C2 A3 still run as A1 B1 C1 A2 C2 A3)."""
    process = start_node_process(
        tmp_path / "node.log",
        redis_url=clean_redis,
        models_dir=models_dir,
        node_id="doomed-node",
        SDAPI_GPU_JOB_LEASE_S="2",
    )
    request = job(steps=100)
    others = {name: job() for name in ("A2", "B1", "C1", "C2", "A3")}
    try:
        await until(lambda: client.exists(node_key("doomed-node")), 120)
        await enqueue_generation(client, request, owner="A")

        async def running() -> bool:
            return len(await events_of(client, request.generation_id)) >= 3

        await until(running, 30)
        # Queued behind the running job: the doomed node takes one at a time.
        for name, other in others.items():
            await enqueue_generation(client, other, owner=name[0])
        process.kill()
        process.wait()
        killed_at = time.monotonic()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    claim = in_progress_key_prefix + generation_job_id(request.generation_id)
    await until(lambda: _gone(client, claim), 15, "the dead node's lease")
    settings = node_settings(models_dir, clean_redis, node_id="rescuer")
    async with (
        KeyEvents(clean_redis) as events,
        running_node(settings, clean_redis, tiny_engine),
    ):
        started_again = await until(
            lambda: _started_by(client, request.generation_id, "rescuer"), 15
        )
        # Claimed again once the dead node's 2 s lease ran out, not after arq's
        # own claim (the function timeout + 10 s: hours).
        assert started_again - killed_at < 10
        result = await result_of(client, request.generation_id, timeout=60)
        for other in others.values():
            await result_of(client, other.generation_id)
    assert result.status is Status.SUCCEEDED and result.node_id == "rescuer"
    names = {generation_job_id(o.generation_id): n for n, o in others.items()}
    names[generation_job_id(request.generation_id)] = "A1"
    claimed = [names[job_id] for job_id in events.claims(list(names))]
    assert claimed == ["A1", "B1", "C1", "A2", "C2", "A3"]


async def _gone(client: redis.asyncio.Redis, key: str) -> bool:
    return not await client.exists(key)


async def _started_by(
    client: redis.asyncio.Redis, generation_id: Any, node: str
) -> float:
    events = await events_of(client, generation_id)
    found = any(getattr(e, "node_id", None) == node for _, e in events)
    return time.monotonic() if found else 0.0


async def test_a_slow_announcer_outlives_its_interval(
    models_dir: Path, clean_redis: str, tiny_engine: Engine, client: redis.asyncio.Redis
) -> None:
    # Refreshed every 30 s, a 15 s announcement would be gone half the time.
    settings = node_settings(
        models_dir,
        clean_redis,
        node_id="slow-announcer",
        gpu_announce_every_s=30,
        gpu_consul_ttl_s=60,
    )
    async with running_node(settings, clean_redis, tiny_engine):
        assert 60 < await client.ttl(node_key("slow-announcer")) <= 90
    with pytest.raises(SettingsError, match="SDAPI_GPU_CONSUL_TTL_S"):
        node_settings(models_dir, clean_redis, gpu_announce_every_s=30)


async def test_a_failed_start_releases_what_it_opened(
    models_dir: Path, clean_redis: str, tiny_engine: Engine, client: redis.asyncio.Redis
) -> None:
    from gpu_node.node import GpuNode

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        settings = node_settings(
            models_dir, clean_redis, node_id="port-taken", gpu_health_port=port
        )
        node = GpuNode(settings, clean_redis, engine=tiny_engine)
        with pytest.raises(OSError):
            await node.start()
    finally:
        taken.close()
    assert not any(t.name == "gpu-tiny" for t in threading.enumerate())
    assert not [
        t
        for t in asyncio.all_tasks()
        if t.get_name() in {"event-publisher", "pubsub", "cancel-recheck"}
    ]
    assert (
        node.metrics.registry.get_sample_value(
            "sdapi_gpu_model_loaded", {"model": "tiny"}
        )
        is None
    )
    assert not await client.exists(node_key("port-taken"))
    await node.close()  # nothing left to close

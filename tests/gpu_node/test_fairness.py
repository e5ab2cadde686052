"""Fair order across users on a premium queue, served by two nodes.

The order is read from Valkey's keyspace notifications (`KeyEvents`): the
order in which the nodes' claims ran on the server, not when each node got
round to reporting. The tags themselves are tested in tests/test_fair_queue.py;
a node killed mid-job in tests/gpu_node/test_node.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpu_node.calls import Engine
from sdapi.contract.names import generation_job_id, premium_queue
from sdapi.contract.payloads import GenerationJob
from sdapi.contract.status import Status
from sdapi.infra.queue import QueuePool, enqueue_generation, request_cancel
from tests.gpu_node.conftest import node_settings, running_node
from tests.gpu_node.support import job, result_of
from tests.key_events import KeyEvents
from tests.support import until

ORDER = ["A1", "A2", "B1", "C1", "C2", "A3"]


@pytest.fixture(scope="module")
def second_engine(models_dir: Path) -> Engine:
    """The tiny model loaded again: each node runs its own GPU thread."""
    from gpu_node import pipeline, weights

    return pipeline.load_engine(weights.locate_model("tiny", models_dir), device="cpu")


@contextlib.asynccontextmanager
async def two_nodes(
    models_dir: Path, redis_url: str, engines: tuple[Engine, Engine]
) -> AsyncIterator[None]:
    async with (
        running_node(
            node_settings(models_dir, redis_url, node_id="fair-1"),
            redis_url,
            engines[0],
        ),
        running_node(
            node_settings(models_dir, redis_url, node_id="fair-2"),
            redis_url,
            engines[1],
        ),
    ):
        yield


def job_id(request: GenerationJob) -> str:
    return generation_job_id(request.generation_id, request.attempt)


async def test_two_nodes_serve_users_in_turn(
    models_dir: Path,
    clean_redis: str,
    tiny_engine: Engine,
    second_engine: Engine,
    client: QueuePool,
) -> None:
    """A1 A2 B1 C1 C2 A3, queued while both nodes are busy, run as
    A1 B1 C1 A2 C2 A3."""
    # Both nodes busy with a long job each (cancelled below), so that the six
    # wait together, as behind any busy cluster.
    blockers = [job(steps=500, width=128, height=128) for _ in range(2)]
    requests = {name: job(steps=2) for name in ORDER}
    async with (
        KeyEvents(clean_redis) as events,
        two_nodes(models_dir, clean_redis, (tiny_engine, second_engine)),
    ):
        for blocker in blockers:
            await enqueue_generation(client, blocker, owner="z")
        await until(lambda: len(events.claims()) == 2, 30, "both blockers claimed")
        for name in ORDER:
            await enqueue_generation(client, requests[name], owner=name[0])
        assert events.claims([job_id(r) for r in requests.values()]) == []
        for blocker in blockers:
            await request_cancel(client, blocker.generation_id)
        results = {
            name: await result_of(client, r.generation_id)
            for name, r in requests.items()
        }
    names = {job_id(r): name for name, r in requests.items()}
    claimed = [names[i] for i in events.claims(list(names))]
    assert claimed == ["A1", "B1", "C1", "A2", "C2", "A3"]
    assert all(r.status is Status.SUCCEEDED for r in results.values())
    assert {r.node_id for r in results.values()} == {"fair-1", "fair-2"}


async def test_a_heavy_users_backlog_delays_a_light_user_by_one_job_per_node(
    models_dir: Path,
    clean_redis: str,
    tiny_engine: Engine,
    second_engine: Engine,
    client: QueuePool,
) -> None:
    heavy = [job(steps=1) for _ in range(40)]
    light = job(steps=1)
    async with (
        KeyEvents(clean_redis) as events,
        two_nodes(models_dir, clean_redis, (tiny_engine, second_engine)),
    ):
        for request in heavy:
            await enqueue_generation(client, request, owner="heavy")
        await enqueue_generation(client, light, owner="light")
        result = await result_of(client, light.generation_id)
        # Arrival order would have had most of the forty ahead of it.
        waiting = await client.zcard(premium_queue("tiny"))
    assert result.status is Status.SUCCEEDED
    assert waiting > 10, "the heavy backlog drained before the light request"
    after = events.claims_after(
        premium_queue("tiny"),
        len(heavy) + 1,
        job_ids=[job_id(request) for request in [*heavy, light]],
    )
    # Claimed next, but for the claims each node had under way as it arrived.
    assert job_id(light) in after[:3], after[:3]

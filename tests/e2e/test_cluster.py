"""Several processes found through Consul: 2 web, 2 GPU nodes, 1 jobs.

The Consul agent is the HTTP double (tests/consul_double.py), run on its own
event loop in a thread so the subprocesses can reach it while the test waits.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sdapi.contract.events import DoneEvent, StartedEvent
from sdapi.contract.names import GPU_SERVICE, premium_queue
from sdapi.contract.status import TERMINAL_STATUSES, Status
from sdapi.db.connection import open_database, truncate_all
from sdapi.db.models import GeneratedImage, Generation
from sdapi.devtools.accounts import make_user
from sdapi.devtools.net import free_port
from sdapi.infra.queue import create_queue_pool
from sdapi.infra.streams import read_events
from tests.consul_double import ConsulDouble
from tests.e2e.conftest import (
    Service,
    Services,
    node_env,
    own_redis_db,
    sdapi_env,
    start_services,
)
from tests.key_events import KeyEvents
from tests.support import until

pytestmark = pytest.mark.slow

# A Valkey database of the suite's server, apart from the other modules'.
REDIS_DB = 13
TTL_S = 3
NODES = ("cluster-a", "cluster-b")
REQUEST = {"prompt": "a harbour in fog", "width": 64, "height": 64, "steps": 30}


class ConsulInThread:
    """The Consul double on an event loop of its own."""

    def __init__(self) -> None:
        self.double = ConsulDouble()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ConsulDouble:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.double.start(), self._loop).result(10)
        return self.double

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.double.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def passing(self, service: str) -> list[str]:
        """Ids of the instances of `service` whose checks all pass."""

        async def read() -> list[str]:
            async with (
                aiohttp.ClientSession() as http,
                http.get(
                    f"{self.double.url}/v1/health/service/{service}?passing"
                ) as response,
            ):
                entries = await response.json()
            return [entry["Service"]["ID"] for entry in entries]

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(10)


@dataclass
class Cluster:
    web_urls: list[str]
    redis_url: str
    services: Services
    consul: ConsulInThread


@pytest.fixture(scope="module")
def cluster(
    database_url: str,
    redis_url: str,
    e2e_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster-e2e")
    own_redis = own_redis_db(redis_url, REDIS_DB)
    asyncio.run(truncate_all(database_url))
    consul = ConsulInThread()
    with consul as double:
        ports = [free_port(), free_port()]
        web_urls = [f"http://127.0.0.1:{port}" for port in ports]
        common: dict[str, object] = {
            "database_url": database_url,
            "redis_url": own_redis,
            "consul_url": double.url,
            "data_dir": root / "data",
            "secret_key": "e2e-secret-key",
            "public_url": web_urls[0],
        }
        services = Services()
        for n, port in enumerate(ports):
            services.add(
                Service(
                    f"web-{n}",
                    "web",
                    # A heavy user's forty requests in flight at once.
                    sdapi_env(**common, port=port, premium_max_in_flight=40),
                    root,
                )
            )
        services.add(
            Service(
                "jobs",
                "jobs",
                sdapi_env(
                    **common,
                    smtp_url=f"smtp://127.0.0.1:{free_port()}",
                    reconcile_interval=1,
                    queued_check_after=3,
                ),
                root,
            )
        )
        for node_id in NODES:
            env = node_env(
                common,
                e2e_model_dir,
                node_id,
                gpu_announce_every_s=1,
                gpu_consul_ttl_s=TTL_S,
                gpu_job_lease_s=2,
                gpu_preview_every=0,
            )
            services.add(Service(node_id, "gpu-node", env, root))
        try:
            start_services(services, web_urls[0], own_redis)
            yield Cluster(web_urls, own_redis, services, consul)
        finally:
            services.stop()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[None]:
    async with open_database(database_url):
        yield


async def submit(
    http: aiohttp.ClientSession,
    url: str,
    auth: dict[str, str],
    seed: int,
    **changes: Any,
) -> dict[str, Any]:
    async with http.post(
        f"{url}/api/v1/generations",
        json={**REQUEST, "seed": seed, **changes},
        headers=auth,
    ) as response:
        body: dict[str, Any] = await response.json()
        assert response.status == 202, body
        return body


async def healthy_nodes(http: aiohttp.ClientSession, url: str, auth: Any) -> int:
    async with http.get(f"{url}/api/v1/status", headers=auth) as response:
        body = await response.json()
    [tiny] = [m for m in body["models"] if m["model"] == "tiny"]
    return int(tiny["nodes"])


async def finished(
    ids: list[str], cluster: Cluster, timeout: float
) -> list[Generation]:
    async def check() -> list[Generation] | None:
        rows = list(await Generation.filter(id__in=ids))
        if len(rows) == len(ids) and all(r.status in TERMINAL_STATUSES for r in rows):
            return rows
        return None

    return await until(check, timeout, "the generations to finish", cluster.services)


async def node_of(pool: Any, generation_id: str) -> set[str]:
    return {
        event.node_id
        for _, event in await read_events(pool, generation_id)
        if isinstance(event, StartedEvent)
    }


async def test_a_heavy_users_backlog_delays_a_light_user_by_one_job_per_node(
    cluster: Cluster, db: None
) -> None:
    """Through both web replicas to both nodes: a light user's one request,
    sent after a heavy user's forty, starts after at most the job each node
    had under way (first, so both nodes are up: the next test kills them)."""
    heavy = (await make_user(premium=True)).headers
    light = (await make_user(premium=True)).headers
    web_a, web_b = cluster.web_urls
    async with (
        KeyEvents(cluster.redis_url) as events,
        aiohttp.ClientSession() as http,
    ):

        async def both_serve() -> bool:
            counts = [await healthy_nodes(http, u, heavy) for u in cluster.web_urls]
            return counts == [2, 2]

        await until(both_serve, 60, "both nodes serving", cluster.services)
        backlog = [
            (await submit(http, (web_a, web_b)[n % 2], heavy, seed=n, steps=4))["id"]
            for n in range(40)
        ]
        mine = (await submit(http, web_b, light, seed=99, steps=4))["id"]
        [row] = await finished([mine], cluster, timeout=60)
        assert row.status is Status.SUCCEEDED
        left = await Generation.filter(
            id__in=backlog, status__in=(Status.QUEUED, Status.RUNNING)
        ).count()
        for ident in backlog:
            async with http.delete(
                f"{web_a}/api/v1/generations/{ident}", headers=heavy
            ) as response:
                assert response.status == 204
        await finished(backlog, cluster, timeout=60)
    # Arrival order would have run most of the forty first.
    assert left > 10, "the heavy backlog drained before the light request"
    # Only these generations' claims: `jobs` claims its own tasks (a start
    # noted, a result stored) from its queue in between.
    after = events.claims_after(
        premium_queue("tiny"), len(backlog) + 1, job_ids=[*backlog, mine]
    )
    assert mine in after[:3], after[:3]


async def test_nodes_come_and_go_and_nothing_is_lost(
    cluster: Cluster, db: None
) -> None:
    auth = (await make_user(premium=True)).headers
    web_a, web_b = cluster.web_urls
    services = cluster.services
    pool = await create_queue_pool(cluster.redis_url)
    async with aiohttp.ClientSession() as http:
        try:

            async def both_registered() -> bool:
                return len(cluster.consul.passing(GPU_SERVICE)) == 2

            await until(both_registered, 60, "both nodes passing", services)
            for url in cluster.web_urls:
                assert await healthy_nodes(http, url, auth) == 2

            # Requests through both web replicas spread over both nodes.
            ids = [
                (await submit(http, (web_a, web_b)[n % 2], auth, seed=n))["id"]
                for n in range(8)
            ]

            async def a_runs_one() -> str | None:
                for ident in ids:
                    row = await Generation.get(id=ident)
                    if row.status is Status.RUNNING and "cluster-a" in await node_of(
                        pool, ident
                    ):
                        return ident
                return None

            victim = await until(a_runs_one, 60, "cluster-a running work", services)
            services["cluster-a"].kill()

            # Its TTL check fails; routing and the status drop it within its
            # TTL plus 5 s.
            async def dropped() -> bool:
                counts = [await healthy_nodes(http, u, auth) for u in cluster.web_urls]
                return counts == [1, 1]

            await until(dropped, TTL_S + 5, "cluster-a dropped", services)
            assert cluster.consul.passing(GPU_SERVICE) == [f"{GPU_SERVICE}-cluster-b"]

            rows = await finished(ids, cluster, timeout=180)
            assert {row.status for row in rows} == {Status.SUCCEEDED}
            assert "cluster-b" in await node_of(pool, victim)
            started_on = set().union(*[await node_of(pool, i) for i in ids])
            assert started_on == {"cluster-a", "cluster-b"}
            # Nothing duplicated: one image and one `done` per generation.
            images = Counter(
                str(i.generation_id)
                for i in await GeneratedImage.filter(generation_id__in=ids)
            )
            assert images == Counter(ids)
            for ident in ids:
                events = [e for _, e in await read_events(pool, ident)]
                assert sum(isinstance(e, DoneEvent) for e in events) == 1

            # The last node goes too: work waits for one, then finishes.
            services["cluster-b"].stop()

            async def none_left() -> bool:
                return await healthy_nodes(http, web_b, auth) == 0

            await until(none_left, TTL_S + 5, "no node left", services)
            waiting = [
                await submit(http, (web_a, web_b)[n % 2], auth, seed=100 + n)
                for n in range(3)
            ]
            assert all(body["waiting_for_node"] for body in waiting)
            later = [body["id"] for body in waiting]
            services["cluster-a"].start()
            rows = await finished(later, cluster, timeout=180)
            assert {row.status for row in rows} == {Status.SUCCEEDED}
            assert await GeneratedImage.filter(generation_id__in=later).count() == 3
        finally:
            await pool.aclose()

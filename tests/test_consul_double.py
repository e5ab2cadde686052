"""The Consul double behaves as the real agent for py-consul: blocking queries,
one global index, TTLs and reaping by an injected clock, a restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import aiohttp
import pytest

from sdapi.infra.consul import open_consul
from tests.consul_double import ConsulDouble
from tests.support import until


class Clock:
    """A clock the test moves; the double reads it on its own ticks."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def double(clock: Clock) -> AsyncIterator[ConsulDouble]:
    consul = ConsulDouble(clock=clock)
    await consul.start()
    try:
        yield consul
    finally:
        await consul.close()


@pytest.fixture
async def client(double: ConsulDouble) -> AsyncIterator[Any]:
    # py-consul's aio client binds to the running loop: made inside it.
    async with open_consul(double.url, timeout_s=30) as consul:
        yield consul


async def blocked(double: ConsulDouble, call: Awaitable[Any]) -> asyncio.Future[Any]:
    """Start `call` and return once the double holds it as a blocking query."""
    holding = double.blocked_queries
    future = asyncio.ensure_future(call)
    await until(lambda: double.blocked_queries > holding or future.done())
    assert not future.done(), "the query was answered at once"
    return future


def ttl_check(ttl: str = "10s", **more: str) -> dict[str, str]:
    return {"TTL": ttl, "Status": "passing", **more}


async def test_without_an_index_a_query_answers_at_once_with_the_index(
    client: Any, double: ConsulDouble
) -> None:
    index, entries = await client.health.service("sdapi-gpu")
    assert entries == []
    assert int(index) == double.index
    index, entries = await client.catalog.service("sdapi-gpu", index=0)
    assert entries == []


async def test_a_blocking_query_without_a_change_waits_out_its_wait(
    client: Any, double: ConsulDouble
) -> None:
    index, _ = await client.health.service("sdapi-gpu")
    started = time.monotonic()
    again, entries = await client.health.service("sdapi-gpu", index=index, wait="1s")
    elapsed = time.monotonic() - started
    # `wait` plus at most wait/16 of jitter.
    # (The upper bound is loose: a loaded machine answers late, never early.)
    assert 1.0 <= elapsed < 1.0 + 1 / 16 + 2.0
    assert again == index
    assert entries == []


async def test_a_registration_wakes_blocked_health_and_catalog_queries(
    client: Any, double: ConsulDouble
) -> None:
    index, _ = await client.health.service("sdapi-gpu", passing=True)
    health = await blocked(
        double,
        client.health.service("sdapi-gpu", index=index, wait="30s", passing=True),
    )
    catalog = await blocked(
        double, client.catalog.service("sdapi-gpu", index=index, wait="30s")
    )
    await client.agent.service.register(
        "sdapi-gpu", service_id="gpu-a", port=9001, check=ttl_check()
    )
    async with asyncio.timeout(5):
        (new_index, entries), (catalog_index, services) = await asyncio.gather(
            health, catalog
        )
    assert int(new_index) > int(index)
    assert int(catalog_index) > int(index)
    assert [e["Service"]["ID"] for e in entries] == ["gpu-a"]
    assert [s["ServiceID"] for s in services] == ["gpu-a"]


async def test_any_change_moves_the_one_global_index(
    client: Any, double: ConsulDouble
) -> None:
    seen = [int((await client.health.service("x"))[0])]
    await client.agent.service.register("x", service_id="x1", check=ttl_check())
    seen.append(int((await client.health.service("x"))[0]))
    await client.agent.check.ttl_warn("service:x1")
    seen.append(int((await client.catalog.service("x"))[0]))
    # Another service's change moves the same index.
    await client.agent.service.register("y", service_id="y1", check=ttl_check())
    seen.append(int((await client.health.service("x"))[0]))
    await client.agent.service.deregister("y1")
    seen.append(int((await client.health.service("x"))[0]))
    assert seen == sorted(set(seen)), seen


async def test_a_ttl_turning_critical_by_the_clock_wakes_a_passing_watch(
    client: Any, double: ConsulDouble, clock: Clock
) -> None:
    await client.agent.service.register(
        "sdapi-gpu", service_id="gpu-a", check=ttl_check()
    )
    index, entries = await client.health.service("sdapi-gpu", passing=True)
    assert len(entries) == 1
    watch = await blocked(
        double,
        client.health.service("sdapi-gpu", index=index, wait="60s", passing=True),
    )
    # Nobody calls the double: its own tick notices the clock moved.
    clock.now += 10.5
    async with asyncio.timeout(5):
        new_index, entries = await watch
    assert int(new_index) > int(index)
    assert entries == []
    _, all_entries = await client.health.service("sdapi-gpu")
    (check,) = [c for c in all_entries[0]["Checks"] if c["CheckID"] != "serfHealth"]
    assert check["Status"] == "critical"
    assert check["Output"] == "TTL expired"


async def test_a_refreshed_ttl_stays_passing_as_the_clock_moves(
    client: Any, double: ConsulDouble, clock: Clock
) -> None:
    await client.agent.service.register("s", service_id="s1", check=ttl_check("10s"))
    for _ in range(3):
        clock.now += 8
        await client.agent.check.ttl_pass("service:s1")
    _, entries = await client.health.service("s", passing=True)
    assert len(entries) == 1


async def test_a_service_critical_past_deregister_after_is_reaped(
    client: Any, double: ConsulDouble, clock: Clock
) -> None:
    await client.agent.service.register(
        "sdapi-gpu",
        service_id="gpu-a",
        check=ttl_check("10s", DeregisterCriticalServiceAfter="30s"),
    )
    clock.now += 11
    await until(lambda: double.checks["service:gpu-a"].status == "critical")
    index, services = await client.catalog.service("sdapi-gpu")
    assert len(services) == 1
    watch = await blocked(
        double, client.catalog.service("sdapi-gpu", index=index, wait="60s")
    )
    clock.now += 30
    async with asyncio.timeout(5):
        new_index, services = await watch
    assert services == []
    assert int(new_index) > int(index)
    assert "gpu-a" not in await client.agent.services()


async def test_an_index_from_the_future_blocks_for_the_wait(
    client: Any, double: ConsulDouble
) -> None:
    # A client that kept an index from before an index reset: Consul answers
    # after `wait` with its own, lower index, and the client starts over.
    future_index = double.index + 100
    started = time.monotonic()
    index, _ = await client.health.service("s", index=future_index, wait="1s")
    assert time.monotonic() - started >= 1.0
    assert int(index) < future_index


async def test_a_restart_keeps_the_port_and_the_state_and_drops_blocked_queries(
    client: Any, double: ConsulDouble
) -> None:
    await client.agent.service.register("s", service_id="s1", check=ttl_check())
    url, index = double.url, double.index
    watch = await blocked(double, client.health.service("s", index=index, wait="60s"))
    await double.stop()
    assert not double.running
    with pytest.raises((aiohttp.ClientError, OSError)):
        await watch
    with pytest.raises((aiohttp.ClientError, OSError)):
        await client.health.service("s")
    await double.start()
    assert double.url == url
    new_index, entries = await client.health.service("s")
    assert int(new_index) == index
    assert [e["Service"]["ID"] for e in entries] == ["s1"]


async def test_malformed_blocking_parameters_are_refused(
    client: Any, double: ConsulDouble
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{double.url}/v1/health/service/s?index=x") as response:
            assert response.status == 400
        async with http.get(
            f"{double.url}/v1/health/service/s?index=1&wait=soon"
        ) as response:
            assert response.status == 400

"""Consul registration of a node, against the Consul agent double."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpu_node.announcer import check_id, service_id
from gpu_node.calls import Engine
from tests.consul_double import ConsulDouble, parse_duration
from tests.gpu_node.conftest import node_settings, running_node
from tests.support import until


async def _get(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        return await response.json()


async def _put(url: str, body: Any = None) -> int:
    async with aiohttp.ClientSession() as http, http.put(url, json=body) as response:
        return response.status


def test_durations() -> None:
    assert parse_duration("15s") == 15
    assert parse_duration("1m30s") == 90
    assert parse_duration("500ms") == 0.5
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("15")


async def test_double_reproduces_ttl_checks(consul: ConsulDouble) -> None:
    body = {
        "Name": "web",
        "ID": "web-1",
        "Port": 8080,
        "Meta": {"version": "1"},
        "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "1m"},
    }
    assert await _put(f"{consul.url}/v1/agent/service/register", body) == 200
    checks = await _get(f"{consul.url}/v1/agent/checks")
    assert list(checks) == ["service:web-1"]
    assert checks["service:web-1"]["Status"] == "critical"  # until first passed
    assert checks["service:web-1"]["Name"] == "Service 'web' check"
    assert await _get(f"{consul.url}/v1/health/service/web?passing") == []

    assert await _put(f"{consul.url}/v1/agent/check/pass/service:web-1?note=ok") == 200
    healthy = await _get(f"{consul.url}/v1/health/service/web?passing")
    assert [e["Service"]["ID"] for e in healthy] == ["web-1"]
    assert [c["CheckID"] for c in healthy[0]["Checks"]] == [
        "serfHealth",
        "service:web-1",
    ]
    assert healthy[0]["Checks"][1]["Output"] == "ok"
    catalog = await _get(f"{consul.url}/v1/catalog/service/web")
    assert catalog[0]["ServiceID"] == "web-1" and catalog[0]["ServiceMeta"] == {
        "version": "1"
    }

    consul.advance(11)  # the TTL runs out
    assert await _get(f"{consul.url}/v1/health/service/web?passing") == []
    check = (await _get(f"{consul.url}/v1/agent/checks"))["service:web-1"]
    assert (check["Status"], check["Output"]) == ("critical", "TTL expired")
    assert len(await _get(f"{consul.url}/v1/health/service/web")) == 1

    update = {"Status": "warning", "Output": "slow"}
    assert (
        await _put(f"{consul.url}/v1/agent/check/update/service:web-1", update) == 200
    )
    assert (await _get(f"{consul.url}/v1/agent/checks"))["service:web-1"][
        "Status"
    ] == "warning"
    assert await _put(f"{consul.url}/v1/agent/check/fail/service:web-1") == 200
    consul.advance(61)  # critical past DeregisterCriticalServiceAfter: reaped
    assert await _get(f"{consul.url}/v1/agent/services") == {}
    assert await _get(f"{consul.url}/v1/catalog/service/web") == []
    assert await _put(f"{consul.url}/v1/agent/check/pass/service:web-1") == 404
    assert await _put(f"{consul.url}/v1/agent/service/deregister/web-1") == 404


async def test_double_names_several_checks(consul: ConsulDouble) -> None:
    body = {
        "name": "api",
        "checks": [{"ttl": "5s"}, {"ttl": "5s", "status": "passing"}],
    }
    assert await _put(f"{consul.url}/v1/agent/service/register", body) == 200
    checks = await _get(f"{consul.url}/v1/agent/checks")
    assert sorted(checks) == ["service:api:1", "service:api:2"]
    bad_meta = {"name": "x", "meta": {"bad key": "v"}}
    assert await _put(f"{consul.url}/v1/agent/service/register", bad_meta) == 400


@pytest.fixture
async def frozen_consul() -> Any:
    """A Consul double whose clock moves only by `advance()`."""
    double = ConsulDouble(clock=lambda: 0.0)
    await double.start()
    try:
        yield double
    finally:
        await double.close()


async def test_node_registers_keeps_passing_and_deregisters(
    frozen_consul: ConsulDouble,
    models_dir: Path,
    clean_redis: str,
    tiny_engine: Engine,
) -> None:
    consul = frozen_consul
    settings = node_settings(
        models_dir,
        clean_redis,
        node_id="consul-node",
        consul_url=consul.url,
        gpu_consul_ttl_s=2,
        gpu_announce_every_s=0.2,
    )
    sid, cid = service_id("consul-node"), check_id("consul-node")
    async with running_node(settings, clean_redis, tiny_engine) as node:
        services = await _get(f"{consul.url}/v1/agent/services")
        assert list(services) == [sid]
        assert services[sid]["Service"] == "sdapi-gpu"
        assert services[sid]["Meta"] == node.info.to_meta()
        checks = await _get(f"{consul.url}/v1/agent/checks")
        assert checks[cid]["Definition"]["DeregisterCriticalServiceAfter"] == "60s"

        # Kept passing by the live node across several TTLs of the agent's
        # clock: each time most of a TTL has gone by, the node passes again.
        def passes() -> int:
            return consul.requests.count(("PUT", f"/v1/agent/check/pass/{cid}"))

        async def most_of_a_ttl_later() -> None:
            before = passes()
            consul.advance(1.5)
            await until(lambda: passes() > before, 10, "the node's next TTL pass")

        for _ in range(3):
            await most_of_a_ttl_later()
            healthy = await _get(f"{consul.url}/v1/health/service/sdapi-gpu?passing")
            assert [e["Service"]["ID"] for e in healthy] == [sid]

        # An agent restart forgets the service: the node registers again.
        consul.services.clear()
        consul.checks.clear()

        async def back() -> bool:
            found = await _get(f"{consul.url}/v1/health/service/sdapi-gpu?passing")
            return bool(found)

        await until(back, 5)
    assert await _get(f"{consul.url}/v1/agent/services") == {}
    assert ("PUT", f"/v1/agent/service/deregister/{sid}") in consul.requests

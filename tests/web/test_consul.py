"""web with Consul: its own registration, and models from healthy GPU nodes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gpu_node.schemas import Status
from sdapi.mailsink import free_port
from tests.consul_double import ConsulDouble
from tests.node_double import auth, make_user, node_info
from web.app import WEB_SERVICE, create_app
from web.keys import registry_key
from web.registry import GPU_SERVICE
from web.settings import WebSettings

AiohttpClient = Callable[..., Any]


@pytest.fixture
async def consul() -> AsyncIterator[ConsulDouble]:
    double = ConsulDouble()
    await double.start()
    try:
        yield double
    finally:
        await double.close()


@pytest.fixture
async def consul_client(
    aiohttp_client: AiohttpClient, web_settings: WebSettings, consul: ConsulDouble
) -> AsyncIterator[TestClient]:
    """The app with Consul configured, listening on the port it registers."""
    port = free_port()
    settings = web_settings.model_copy(
        update={"consul_url": consul.url, "port": port, "host": "127.0.0.1"}
    )
    client: TestClient = await aiohttp_client(
        create_app(settings), server_kwargs={"port": port}
    )
    yield client
    await client.close()  # while the Consul double still answers


async def register_node(consul: ConsulDouble, *, ttl: str = "15s") -> None:
    """A GPU node as `gpu_node.announcer` registers it, its TTL check passing."""
    info = node_info(node_id="gpu-a")
    service_id = f"{GPU_SERVICE}-{info.node_id}"
    async with aiohttp.ClientSession(base_url=consul.url) as http:
        async with http.put(
            "/v1/agent/service/register",
            json={
                "Name": GPU_SERVICE,
                "ID": service_id,
                "Meta": info.to_meta(),
                "Check": {"TTL": ttl, "DeregisterCriticalServiceAfter": "1m"},
            },
        ) as response:
            assert response.status == 200
        async with http.put(f"/v1/agent/check/pass/service:{service_id}") as response:
            assert response.status == 200


async def test_web_registers_with_an_http_check_and_deregisters(
    consul_client: TestClient, consul: ConsulDouble
) -> None:
    [service] = [s for s in consul.services.values() if s.name == WEB_SERVICE]
    assert service.port == consul_client.server.port
    [check] = [consul.checks[c] for c in service.checks]
    assert check.http.endswith("/healthz")
    # The agent runs the check every interval; the first ran before the app
    # listened, the next one finds it healthy.
    consul.advance(10)
    for _ in range(100):
        if check.status == "passing":
            break
        await asyncio.sleep(0.05)
    assert check.status == "passing", check.output
    assert "200 OK" in check.output

    await consul_client.close()
    assert not any(s.name == WEB_SERVICE for s in consul.services.values())


async def test_models_and_premium_requests_follow_gpu_node_health(
    consul_client: TestClient, consul: ConsulDouble
) -> None:
    _, secret = await make_user(premium=True)
    headers = auth(secret)
    registry = consul_client.app[registry_key]
    assert registry.uses_consul

    await register_node(consul)
    registry.invalidate()
    models = await (await consul_client.get("/api/v1/models", headers=headers)).json()
    [tiny] = [m for m in models["items"] if m["id"] == "tiny"]
    assert tiny["available"] is True and tiny["nodes"] == 1
    accepted = await consul_client.post(
        "/api/v1/generations",
        json={"prompt": "a red fox", "width": 64, "height": 64},
        headers=headers,
    )
    assert accepted.status == 202
    assert (await accepted.json())["status"] == Status.QUEUED

    # The node stops refreshing its TTL: Consul marks it critical, and web no
    # longer routes to it.
    consul.advance(16)
    registry.invalidate()
    models = await (await consul_client.get("/api/v1/models", headers=headers)).json()
    [tiny] = [m for m in models["items"] if m["id"] == "tiny"]
    assert tiny["available"] is False and tiny["nodes"] == 0
    refused = await consul_client.post(
        "/api/v1/generations",
        json={"prompt": "a red fox", "width": 64, "height": 64},
        headers=headers,
    )
    assert refused.status == 503
    assert int(refused.headers["Retry-After"]) > 0
    assert (await refused.json())["error"]["code"] == "unavailable"

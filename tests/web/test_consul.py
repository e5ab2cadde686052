"""web with Consul: its own registration, and models from healthy GPU nodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from sdapi.contract.names import GPU_SERVICE, KNOWN_MODELS_KEY, WEB_SERVICE
from sdapi.contract.status import Status
from sdapi.devtools.accounts import auth, make_user
from sdapi.devtools.net import free_port
from sdapi.infra.consul import open_consul
from sdapi.infra.registry import NodeRegistry, NodesUnknown
from sdapi.infra.settings import SettingsError
from tests.consul_double import ConsulDouble
from tests.node_double import node_info
from tests.support import until
from web.app import create_app
from web.appkeys import registry_key
from web.settings import WebSettings

AiohttpClient = Callable[..., Any]


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
    assert check.http.endswith("/readyz")
    # The agent runs the check every interval; the first ran before the app
    # listened, the next one finds it healthy.
    consul.advance(10)
    await until(lambda: check.status == "passing", 5, "a passing HTTP check")
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
    # Scaled to zero or restarting: the request waits in the queue for a
    # node (the queue depth the autoscaler reads counts it).
    waiting = await consul_client.post(
        "/api/v1/generations",
        json={"prompt": "a red fox", "width": 64, "height": 64},
        headers=headers,
    )
    assert waiting.status == 202
    body = await waiting.json()
    assert body["status"] == Status.QUEUED and body["waiting_for_node"] is True
    assert body["queue_position"] == 1  # behind the first request


# --- regression tests of the review ---------------------------------------


async def sick_consul(aiohttp_server: Any, behaviour: str) -> str:
    """A Consul agent that answers health queries with a 500, or never."""

    async def health(request: web.Request) -> web.Response:
        if behaviour == "hang":
            # The hang is what is tested: a query the agent never answers.
            await asyncio.sleep(3600)
        return web.Response(status=500, text="rpc error: No cluster leader")

    app = web.Application()
    app.router.add_get("/v1/health/service/{name}", health)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


class Agent:
    """A Consul client whose agent can be swapped for a sick one."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @property
    def health(self) -> Any:
        return self.client.health


@pytest.mark.parametrize("behaviour", ["error", "hang", "refused"])
async def test_consul_trouble_is_a_503_or_the_last_nodes_never_a_500_or_a_hang(
    aiohttp_server: Any,
    redis_client: Any,
    consul: ConsulDouble,
    behaviour: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if behaviour == "refused":
        url = f"http://127.0.0.1:{free_port()}"
    else:
        url = await sick_consul(aiohttp_server, behaviour)
    async with open_consul(url, timeout_s=0.3) as client:
        registry = NodeRegistry(redis_client, client, cache_s=0)
        started = time.monotonic()
        with pytest.raises(NodesUnknown) as caught:
            await registry.nodes()
        assert time.monotonic() - started < 2
        assert caught.value.retry_after_s > 0
    assert "cannot list sdapi-gpu services in Consul" in caplog.text

    # Once nodes were seen, trouble keeps them in use.
    await register_node(consul)
    async with (
        open_consul(consul.url) as healthy,
        open_consul(url, timeout_s=0.3) as sick,
    ):
        agent = Agent(healthy)
        registry = NodeRegistry(redis_client, agent, cache_s=0)
        [seen] = await registry.nodes()
        agent.client = sick  # the agent falls ill
        started = time.monotonic()
        assert await registry.nodes() == [seen]
        assert time.monotonic() - started < 2
        offers = await registry.offers()
        assert offers["tiny"].available


async def test_models_stay_served_while_consul_is_down(
    consul_client: TestClient, consul: ConsulDouble
) -> None:
    _, secret = await make_user(premium=True)
    await register_node(consul)
    registry = consul_client.app[registry_key]
    registry.invalidate()
    first = await consul_client.get("/api/v1/models", headers=auth(secret))
    assert first.status == 200
    ready = await consul_client.get("/readyz")
    assert (await ready.json())["consul"] is True
    await consul.close()
    registry.invalidate()
    again = await consul_client.get("/api/v1/models", headers=auth(secret))
    assert again.status == 200
    assert await again.json() == await first.json()
    # Still ready (the last view serves), and it says Consul does not answer.
    ready = await consul_client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["consul"] is False


async def test_malformed_known_models_entries_are_skipped(
    client: TestClient, redis_client: Any
) -> None:
    await redis_client.hset(KNOWN_MODELS_KEY, "tiny", b"{not json")
    _, secret = await make_user()
    response = await client.get("/api/v1/models", headers=auth(secret))
    assert response.status == 200, await response.text()
    [tiny] = (await response.json())["items"]
    assert tiny["id"] == "tiny"
    assert tiny["available"] is False


async def test_service_addresses_come_from_consul_names(
    consul: ConsulDouble, tmp_path: Any
) -> None:
    async with aiohttp.ClientSession(base_url=consul.url) as http:
        for name, port in (("sdapi-redis", 6390), ("sdapi-postgres", 5440)):
            async with http.put(
                "/v1/agent/service/register",
                json={"Name": name, "Address": "10.0.0.7", "Port": port},
            ) as response:
                assert response.status == 200
    settings = WebSettings(
        consul_url=consul.url,
        redis_url="redis://sdapi-redis.service.consul/3",
        database_url="postgres://sdapi:s3cret@sdapi-postgres.service.consul/sdapi",
        secret_key=SecretStr("k"),
        data_dir=tmp_path,
    )
    # Resolution blocks (start-up only): off the loop that serves the double.
    resolved = await asyncio.to_thread(settings.resolved)
    assert resolved.redis_url == "redis://10.0.0.7:6390/3"
    assert resolved.database_url == "postgres://sdapi:s3cret@10.0.0.7:5440/sdapi"

    unknown = settings.model_copy(
        update={"redis_url": "redis://sdapi-valkey.service.consul/0"}
    )
    with pytest.raises(SettingsError, match=r"SDAPI_REDIS_URL: .*'sdapi-valkey'"):
        await asyncio.to_thread(unknown.resolved)


class CountingHealth:
    """A Consul client's `health` endpoint that counts the calls made to it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.calls = 0

    @property
    def health(self) -> Any:
        return self

    async def service(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return await self.client.health.service(*args, **kwargs)


async def test_the_watch_keeps_consul_off_the_request_path(
    redis_client: Any, consul: ConsulDouble
) -> None:
    async with open_consul(consul.url) as client:
        agent = CountingHealth(client)
        registry = NodeRegistry(redis_client, client)
        async with registry.watching(agent, wait_s=1):
            assert await registry.nodes() == []
            await register_node(consul)

            async def seen() -> bool:
                return bool(registry.serves("tiny"))

            await until(seen, 10)
            calls = agent.calls
            for _ in range(50):
                assert len(await registry.nodes()) == 1
                assert (await registry.offers())["tiny"].available
            # Reads are in memory: fifty of them cost the agent nothing.
            assert agent.calls - calls < 5
            assert registry.consul_ok is True


async def test_the_watch_follows_nodes_by_blocking_queries_and_outlives_a_restart(
    redis_client: Any, consul: ConsulDouble
) -> None:
    service_id = f"{GPU_SERVICE}-gpu-a"
    # A long wait: a change seen in well under it came from a blocking query
    # that woke up, not from a poll or an invalidate().
    wait_s = 30
    async with open_consul(consul.url, timeout_s=wait_s * 1.25 + 5) as client:
        agent = CountingHealth(client)
        registry = NodeRegistry(redis_client, client)
        async with registry.watching(agent, wait_s=wait_s):
            assert await registry.nodes() == []
            await until(lambda: consul.blocked_queries > 0, 5)

            started = time.monotonic()
            await register_node(consul)
            await until(lambda: registry.serves("tiny") is True, 5)
            async with aiohttp.ClientSession(base_url=consul.url) as http:
                async with http.put(
                    f"/v1/agent/service/deregister/{service_id}"
                ) as response:
                    assert response.status == 200
            await until(lambda: not registry.serves("tiny"), 5)
            assert time.monotonic() - started < wait_s / 2
            # About one query per change (register, pass, deregister) and the
            # ones that were waiting: a 50 ms poll would have made dozens.
            assert agent.calls <= 10

            # The agent goes away: the last view stays, the watch says so...
            await register_node(consul)
            await until(lambda: registry.serves("tiny") is True, 5)
            await consul.stop()
            await until(lambda: registry.consul_ok is False, 10)
            assert len(await registry.nodes()) == 1
            # ... and picks up again by itself once the agent is back.
            await consul.start()
            await until(lambda: registry.consul_ok is True, 15)
            async with aiohttp.ClientSession(base_url=consul.url) as http:
                async with http.put(
                    f"/v1/agent/service/deregister/{service_id}"
                ) as response:
                    assert response.status == 200
            await until(lambda: not registry.serves("tiny"), 5)

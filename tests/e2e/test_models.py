"""Models as users bring them, end to end: a catalogue of two models (the tiny
one and a single-file checkpoint), a LoRA from the node's folder, through
REST, the WebSocket and the OpenAI route; and two nodes each holding one
model loaded, where every request goes to the node that has its model."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from sdapi.contract.events import StartedEvent
from sdapi.db.connection import open_database, truncate_all
from sdapi.devtools.accounts import make_user
from sdapi.devtools.net import free_port
from sdapi.infra.queue import create_queue_pool
from sdapi.infra.streams import read_events
from tests.e2e.conftest import (
    Service,
    Services,
    answers_200,
    node_env,
    own_redis_db,
    sdapi_env,
    start_services,
)
from tests.gpu_node.lora_support import write_lora
from tests.gpu_node.single_file_support import tiny_single_file
from tests.support import until, until_sync

pytestmark = pytest.mark.slow

# Valkey databases of the suite's server, apart from the other modules'.
CATALOGUE_REDIS_DB = 9
SCHEDULING_REDIS_DB = 10
LORA = "fox"
SMALL = {"width": 64, "height": 64, "steps": 4}


@pytest.fixture(scope="module")
def single_file(e2e_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as one LDM-layout file, as model sites ship checkpoints."""
    from gpu_node import tiny, weights

    # Built here (the nodes would build it too): the file is made from it.
    tiny.prepare_model(weights.locate_model("tiny", e2e_model_dir))
    folder = tmp_path_factory.mktemp("checkpoints")
    return tiny_single_file(e2e_model_dir / "tiny", folder / "other.safetensors")


def common_settings(
    database_url: str, redis_url: str, root: Path, base_url: str, models: str
) -> dict[str, object]:
    return {
        "database_url": database_url,
        "redis_url": redis_url,
        "data_dir": root / "data",
        "secret_key": "e2e-secret-key",
        "public_url": base_url,
        # Web and jobs read the catalogue's names from the same variable.
        "models": models,
    }


def base_services(
    common: dict[str, object], port: int, root: Path, **web: object
) -> Services:
    services = Services()
    services.add(Service("web", "web", sdapi_env(**common, port=port, **web), root))
    services.add(
        Service(
            "jobs",
            "jobs",
            sdapi_env(**common, smtp_url=f"smtp://127.0.0.1:{free_port()}"),
            root,
        )
    )
    return services


def addnet_hash(path: Path) -> str:
    """SHA-256 of a safetensors file's tensor data, past its JSON header: the
    hash A1111 shows for a LoRA (metadata edits do not change it)."""
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header :]).hexdigest()


@dataclass
class Stack:
    base_url: str
    redis_url: str
    services: Services
    lora_sha256: str

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/api/v1/ws"


@pytest.fixture(scope="module")
def stack(
    database_url: str,
    redis_url: str,
    e2e_model_dir: Path,
    single_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("models-e2e")
    own_redis = own_redis_db(redis_url, CATALOGUE_REDIS_DB)
    asyncio.run(truncate_all(database_url))
    lora_dir = root / "loras"
    lora_dir.mkdir()
    lora = write_lora(lora_dir / f"{LORA}.safetensors", seed=1)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    common = common_settings(
        database_url, own_redis, root, base_url, f"tiny,other={single_file}"
    )
    services = base_services(common, port, root)
    node = node_env(
        common, e2e_model_dir, "models-node", lora_dir=lora_dir, gpu_preview_every=0
    )
    services.add(Service("gpu-node", "gpu-node", node, root))
    try:
        start_services(services, base_url, own_redis)
        yield Stack(base_url, own_redis, services, addnet_hash(lora))
    finally:
        services.stop()


@dataclass
class Client:
    http: aiohttp.ClientSession
    auth: dict[str, str]
    services: Services

    async def submit(self, request: dict[str, Any]) -> str:
        async with self.http.post(
            "/api/v1/generations", json=request, headers=self.auth
        ) as response:
            body: dict[str, Any] = await response.json()
            assert response.status == 202, body
            return str(body["id"])

    async def finished(self, ident: str, timeout: float = 120) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            path = f"/api/v1/generations/{ident}"
            async with self.http.get(path, headers=self.auth) as response:
                body: dict[str, Any] = await response.json()
            return body if body["finished_at"] else None

        found: dict[str, Any] | None = await until(
            check, timeout, f"generation {ident}", self.services
        )
        assert found is not None
        return found

    async def download(self, ident: str, index: int = 0) -> bytes:
        path = f"/api/v1/generations/{ident}/images/{index}"
        async with self.http.get(path, headers=self.auth) as response:
            assert response.status == 200
            return await response.read()


@pytest.fixture
async def client(stack: Stack, database_url: str) -> AsyncIterator[Client]:
    async with open_database(database_url, pool_size=1):
        auth = (await make_user(premium=True)).headers
    async with aiohttp.ClientSession(base_url=stack.base_url) as http:
        yield Client(http, auth, stack.services)


def parameters(png: bytes) -> str:
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (64, 64)
        return str(image.text["parameters"])  # type: ignore[attr-defined]


def names_the_lora(text: str, stack: Stack, weight: str) -> bool:
    return (
        f"<lora:{LORA}:{weight}>" in text
        and f'Lora hashes: "{LORA}: {stack.lora_sha256[:10]}"' in text
    )


async def test_the_catalogue_and_its_lora_are_listed(
    client: Client, stack: Stack
) -> None:
    async with client.http.get("/api/v1/models", headers=client.auth) as response:
        items = {item["id"]: item for item in (await response.json())["items"]}
    assert {"tiny", "other"} <= set(items)
    for name in ("tiny", "other"):
        assert items[name]["state"] == "ready"
        assert [lora["name"] for lora in items[name]["loras"]] == [LORA]


@pytest.mark.parametrize("model", ["tiny", "other"])
async def test_rest_serves_both_models_with_the_lora(
    client: Client, stack: Stack, model: str
) -> None:
    ident = await client.submit(
        {
            **SMALL,
            "model": model,
            "prompt": "a red fox in the snow",
            "loras": [{"name": LORA, "weight": 0.8}],
            "seed": 3,
        }
    )
    body = await client.finished(ident)
    assert body["status"] == "succeeded", body
    assert body["request"]["loras"] == [
        {"name": LORA, "weight": 0.8, "sha256": stack.lora_sha256}
    ]
    text = parameters(await client.download(ident))
    assert names_the_lora(text, stack, "0.8"), text
    assert f"Model: {model}," in text, text
    # Without the LoRA the same seed gives other pixels: it was applied.
    plain = await client.submit(
        {**SMALL, "model": model, "prompt": "a red fox in the snow", "seed": 3}
    )
    assert (await client.finished(plain))["status"] == "succeeded"
    assert await client.download(plain) != await client.download(ident)


@pytest.mark.parametrize("model", ["tiny", "other"])
async def test_the_websocket_serves_both_models_with_a_lora_tag(
    client: Client, stack: Stack, model: str
) -> None:
    request = {
        **SMALL,
        "model": model,
        "prompt": f"a red fox <lora:{LORA}:0.5> in the snow",
        "seed": 4,
    }
    async with client.http.ws_connect(stack.ws_url, headers=client.auth) as ws:
        await ws.send_json({"type": "generate", "request": request})
        accepted = await ws.receive_json(timeout=30)
        assert accepted["type"] == "accepted", accepted
        ident = accepted["id"]
        stored = accepted["generation"]["request"]
        assert "<lora" not in stored["prompt"]
        assert [(lora["name"], lora["weight"]) for lora in stored["loras"]] == [
            (LORA, 0.5)
        ]
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(120):
            while not frames or frames[-1]["type"] != "done":
                frame = await ws.receive_json()
                if frame.get("id") == ident:
                    frames.append(frame)
    assert frames[-1] == {"type": "done", "id": ident, "status": "succeeded"}
    [image] = [frame for frame in frames if frame["type"] == "image"]
    pushed = base64.b64decode(image["data"])
    assert await client.download(ident) == pushed
    text = parameters(pushed)
    assert names_the_lora(text, stack, "0.5"), text


async def test_the_openai_route_serves_the_single_file_model_with_a_lora(
    client: Client, stack: Stack
) -> None:
    async with client.http.post(
        "/v1/images/generations",
        json={
            "prompt": f"a red fox <lora:{LORA}:0.7>",
            "model": "other",
            "size": "64x64",
            "response_format": "b64_json",
        },
        headers=client.auth,
    ) as response:
        result = await response.json()
        assert response.status == 200, result
    [item] = result["data"]
    text = parameters(base64.b64decode(item["b64_json"]))
    assert names_the_lora(text, stack, "0.7"), text


# Two nodes, each with one of the two models loaded.
NODE_A, NODE_B = "sched-a", "sched-b"
REQUESTS = 20


@dataclass
class Pair:
    base_url: str
    redis_url: str
    services: Services
    metrics: dict[str, str]


@pytest.fixture(scope="module")
def pair(
    database_url: str,
    redis_url: str,
    e2e_model_dir: Path,
    single_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("scheduling-e2e")
    own_redis = own_redis_db(redis_url, SCHEDULING_REDIS_DB)
    asyncio.run(truncate_all(database_url))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    common = common_settings(
        database_url, own_redis, root, base_url, f"tiny,other={single_file}"
    )
    # All of the mixed requests queued at once.
    services = base_services(common, port, root, premium_max_in_flight=REQUESTS)
    metrics = {}
    # A budget of one model loads only the first of each node's catalogue.
    for node_id, models in (
        (NODE_A, f"tiny,other={single_file}"),
        (NODE_B, f"other={single_file},tiny"),
    ):
        health_port = free_port()
        metrics[node_id] = f"http://127.0.0.1:{health_port}/metrics"
        env = node_env(
            {**common, "models": models},
            e2e_model_dir,
            node_id,
            gpu_ram_budget_bytes=0,
            gpu_health_port=health_port,
            # Longer than the whole test's work takes here: a node never
            # claims the other's model while that node is up.
            gpu_cold_claim_delay_s=120,
            gpu_switch_after_s=120,
            gpu_preview_every=0,
        )
        services.add(Service(node_id, "gpu-node", env, root))
    try:
        start_services(services, base_url, own_redis)
        # The index counts one entry per model a node serves: one node
        # announced already makes two; wait for each node itself.
        for node_id, url in metrics.items():
            until_sync(lambda url=url: answers_200(url), 120, node_id, services)  # type: ignore[misc]
        yield Pair(base_url, own_redis, services, metrics)
    finally:
        services.stop()


def model_loads(metrics_url: str) -> dict[str, float]:
    """`sdapi_gpu_model_loads_total` of a node, by model."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    loads = {}
    for line in text.splitlines():
        if line.startswith("sdapi_gpu_model_loads_total{"):
            labels, value = line.rsplit(" ", 1)
            loads[labels.split('model="', 1)[1].split('"', 1)[0]] = float(value)
    return loads


async def test_two_nodes_two_models_mixed_requests_load_nothing(
    pair: Pair, database_url: str
) -> None:
    async with open_database(database_url, pool_size=1):
        auth = (await make_user(premium=True)).headers
    before = {node: model_loads(url) for node, url in pair.metrics.items()}
    # Each node loaded its first model at start, and only that one.
    assert before == {NODE_A: {"tiny": 1.0}, NODE_B: {"other": 1.0}}
    models = ["tiny", "other"] * (REQUESTS // 2)
    pool = await create_queue_pool(pair.redis_url)
    try:
        async with aiohttp.ClientSession(base_url=pair.base_url) as http:
            client = Client(http, auth, pair.services)
            ids = [
                await client.submit(
                    {**SMALL, "model": model, "prompt": "a fox", "seed": n}
                )
                for n, model in enumerate(models)
            ]
            bodies = [await client.finished(ident) for ident in ids]
        assert [body["status"] for body in bodies] == ["succeeded"] * REQUESTS
        ran_on = []
        for ident in ids:
            events = [event for _, event in await read_events(pool, ident)]
            ran_on.append({e.node_id for e in events if isinstance(e, StartedEvent)})
    finally:
        await pool.aclose()
    expected = {"tiny": {NODE_A}, "other": {NODE_B}}
    assert ran_on == [expected[model] for model in models]
    after = {node: model_loads(url) for node, url in pair.metrics.items()}
    assert after == before

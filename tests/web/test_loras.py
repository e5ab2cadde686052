"""LoRAs per request: the field, the prompt tags, and what the nodes announced."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sdapi.contract.nodes import LoraOffer, NodeInfo
from sdapi.devtools.accounts import auth, make_user
from sdapi.infra.announcements import withdraw_node
from tests.node_double import NodeDouble, jobs_context, node_info
from web.appkeys import registry_key
from web.settings import WebSettings

GENERATIONS = "/api/v1/generations"
SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}
FOX = LoraOffer(name="fox", kind="tiny", trigger_words=["fox"], sha256="a" * 64)
WOLF = LoraOffer(name="wolf style", kind="tiny", sha256="b" * 64)
BIG = LoraOffer(name="big", kind="sdxl", sha256="c" * 64)
WITH_LORAS = node_info(lora_kind="tiny", loras=[FOX, WOLF, BIG])


@pytest.fixture
async def lora_node(
    client: TestClient, web_settings: WebSettings
) -> AsyncIterator[NodeDouble]:
    """A `tiny` node double that announces three LoRAs (one for SDXL)."""
    assert web_settings.redis_url and web_settings.database_url
    async with jobs_context(web_settings.redis_url, web_settings.database_url) as ctx:
        double = NodeDouble(ctx, WITH_LORAS)
        await double.announce()
        yield double


async def post(client: TestClient, body: dict[str, Any]) -> tuple[int, Any]:
    _, secret = await make_user()
    response = await client.post(GENERATIONS, json=body, headers=auth(secret))
    return response.status, await response.json()


async def test_lora_field_and_prompt_tags_reach_the_node_and_the_stored_request(
    client: TestClient, lora_node: NodeDouble
) -> None:
    status, data = await post(
        client,
        {
            **SMALL,
            "prompt": "a red <lora:wolf style:-0.5>fox<LORA:fox> in snow",
            "loras": [],
        },
    )
    assert status == 202, data
    request = data["request"]
    assert request["prompt"] == "a red fox in snow"
    assert request["loras"] == [
        {"name": "wolf style", "weight": -0.5, "sha256": WOLF.sha256},
        {"name": "fox", "weight": 1.0, "sha256": FOX.sha256},
    ]
    job = await lora_node.claim()
    assert job.params.prompt == "a red fox in snow"
    assert [(lora.name, lora.weight) for lora in job.params.loras] == [
        ("wolf style", -0.5),
        ("fox", 1.0),
    ]


async def test_lora_prompt_tag_equals_the_field_in_the_batch_key(
    client: TestClient, lora_node: NodeDouble
) -> None:
    await post(client, {**SMALL, "prompt": "a red fox <lora:fox:0.7>"})
    await post(client, {**SMALL, "loras": [{"name": "fox", "weight": 0.7}]})
    jobs = [await lora_node.claim(), await lora_node.claim()]
    assert jobs[0].params.batch_key() == jobs[1].params.batch_key()
    assert {j.params.prompt for j in jobs} == {"a red fox"}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"loras": [{"name": "otter"}]}, "'otter'"),
        ({"prompt": "a fox <lora:otter:1>"}, "'otter'"),
        ({"loras": [{"name": "big", "weight": 0.5}]}, "'big' is for sdxl"),
        ({"prompt": "a fox <lora:fox:x>"}, "<lora:fox:x>"),
        ({"prompt": "a fox <lora:fox:9>"}, "'fox'"),
        ({"loras": [{"name": "fox"}], "prompt": "a <lora:fox:1>"}, "more than once"),
    ],
)
async def test_unknown_or_foreign_lora_is_a_422_naming_it(
    client: TestClient, lora_node: NodeDouble, body: dict[str, Any], named: str
) -> None:
    status, data = await post(client, {**SMALL, **body})
    assert status == 422, data
    assert named in str(data["error"]["details"])


async def test_models_list_the_loras_their_nodes_announce(
    client: TestClient, lora_node: NodeDouble
) -> None:
    _, secret = await make_user()
    response = await client.get("/api/v1/models", headers=auth(secret))
    data = await response.json()
    (tiny,) = [item for item in data["items"] if item["id"] == "tiny"]
    assert [(lora["name"], lora["kind"]) for lora in tiny["loras"]] == [
        ("big", "sdxl"),
        ("fox", "tiny"),
        ("wolf style", "tiny"),
    ]
    assert tiny["loras"][1]["trigger_words"] == ["fox"]
    # Only `fox` and `wolf style` fit it: a picker filters on this.
    assert tiny["lora_kind"] == "tiny"


def test_node_announcement_keeps_its_loras_through_consul_meta() -> None:
    many = [
        LoraOffer(name=f"style {i}", kind="sd1", trigger_words=["x" * 40] * 5)
        for i in range(20)
    ]
    info = node_info(lora_kind="sd1", loras=many)
    meta = info.to_meta()
    assert all(len(value) <= 512 for value in meta.values())
    assert NodeInfo.from_meta(meta) == info


async def test_loras_last_announced_stay_accepted_while_no_node_serves_the_model(
    client: TestClient, lora_node: NodeDouble
) -> None:
    status, _ = await post(client, SMALL)
    assert status == 202
    await withdraw_node(lora_node.redis, WITH_LORAS.node_id)
    client.app[registry_key].invalidate()
    status, data = await post(client, {**SMALL, "loras": [{"name": "fox"}]})
    assert status == 202, data
    assert data["waiting_for_node"] is True
    status, data = await post(client, {**SMALL, "loras": [{"name": "otter"}]})
    assert status == 422
    assert "'otter'" in str(data["error"]["details"])

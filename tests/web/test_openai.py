"""`POST /v1/images/generations`: OpenAI's shapes, premium only, synchronous."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sdapi.contract.status import Status
from sdapi.db.models import GeneratedImage, Generation
from sdapi.devtools.accounts import auth, make_user
from tests.image_support import stored_bytes
from tests.node_double import NodeDouble, jobs_context
from web.app import create_app
from web.settings import WebSettings

IMAGES = "/v1/images/generations"
BODY = {"prompt": "a red fox", "size": "64x64", "model": "tiny"}


def assert_openai_error(
    body: dict[str, Any], code: str, param: str | None = None
) -> None:
    assert set(body) == {"error"}
    # OpenAI's four keys, plus the contract's `details` (OpenAI clients ignore it).
    assert set(body["error"]) == {"message", "type", "param", "code", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["param"] == param
    assert body["error"]["message"]
    details = body["error"]["details"]
    assert isinstance(details, list)
    if param is not None and code == "validation_error":
        assert param in [detail["field"] for detail in details]


async def test_the_official_client_gets_b64_json_images(
    client: TestClient, node: NodeDouble
) -> None:
    import openai

    _, secret = await make_user()
    api = openai.AsyncOpenAI(
        api_key=secret, base_url=str(client.make_url("/v1")), max_retries=0
    )
    call = api.images.generate(
        prompt="a red fox",
        model="tiny",
        n=2,
        size="64x64",
        response_format="b64_json",
        user="end-user-7",
    )
    task = asyncio.ensure_future(call)
    await node.run(await node.claim())
    response = await task
    await api.close()
    assert isinstance(response.created, int)
    [generation] = await Generation.all()
    assert response.created == int(generation.created_at.timestamp())
    stored = await GeneratedImage.filter(generation_id=generation.id).order_by("index")
    assert [base64.b64decode(item.b64_json or "") for item in response.data] == [
        await stored_bytes(image) for image in stored
    ]
    assert all(item.url is None for item in response.data)


async def test_url_format_links_work_without_credentials(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    call = client.post(IMAGES, json=BODY, headers=auth(secret))
    task = asyncio.ensure_future(call)
    await node.run(await node.claim())
    response = await task
    assert response.status == 200
    body = await response.json()
    assert set(body) == {"created", "data"}
    [item] = body["data"]
    assert set(item) == {"url"}
    url = item["url"]
    assert url.startswith("http://testserver.local/api/v1/generations/")
    assert "signature=" in url
    path = url.removeprefix("http://testserver.local")
    image = await client.get(path)
    assert image.status == 200
    assert image.headers["Content-Type"] == "image/png"
    assert (await image.read()).startswith(b"\x89PNG")


async def test_size_auto_uses_the_models_default(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    task = asyncio.ensure_future(
        client.post(
            IMAGES, json={"prompt": "a fox", "size": "auto"}, headers=auth(secret)
        )
    )
    job = await node.claim()
    assert (job.params.width, job.params.height) == (64, 64)
    await node.run(job)
    assert (await task).status == 200


async def test_normal_tokens_get_403_premium_required(
    client: TestClient, node: NodeDouble
) -> None:
    import openai

    _, secret = await make_user(premium=False)
    api = openai.AsyncOpenAI(
        api_key=secret, base_url=str(client.make_url("/v1")), max_retries=0
    )
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await api.images.generate(prompt="a fox", size="64x64")
    await api.close()
    assert caught.value.status_code == 403
    assert caught.value.code == "premium_required"
    assert caught.value.type == "permission_error"
    assert await Generation.all().count() == 0


async def test_missing_or_wrong_credentials_are_401_in_openai_shape(
    client: TestClient,
) -> None:
    for headers in ({}, {"Authorization": "Bearer sdapi_nope"}):
        response = await client.post(IMAGES, json=BODY, headers=headers)
        assert response.status == 401
        body = await response.json()
        assert_openai_error(body, "unauthorized")
        assert body["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"size": "100x100"}, "size"),
        ({"size": "4096x4096"}, "size"),
        ({"size": "big"}, "size"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x" * 100_000}, "prompt"),
        ({"model": "dall-e-3"}, "model"),
        ({"response_format": "png"}, "response_format"),
        ({"quality": "hd"}, "quality"),
    ],
)
async def test_invalid_parameters_are_400_naming_the_param(
    client: TestClient, node: NodeDouble, change: dict[str, Any], param: str
) -> None:
    _, secret = await make_user()
    response = await client.post(IMAGES, json={**BODY, **change}, headers=auth(secret))
    assert response.status == 400
    body = await response.json()
    assert_openai_error(body, "validation_error", param)
    assert body["error"]["type"] == "invalid_request_error"
    assert await Generation.all().count() == 0


async def test_malformed_json_is_400_in_openai_shape(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    response = await client.post(
        IMAGES, data="{", headers={**auth(secret), "Content-Type": "application/json"}
    )
    assert response.status == 400
    assert_openai_error(await response.json(), "bad_request")


async def test_unknown_v1_paths_use_openai_shape_and_api_paths_keep_ours(
    client: TestClient,
) -> None:
    response = await client.get("/v1/models/nope")
    assert response.status == 404
    assert_openai_error(await response.json(), "not_found")
    ours = await client.get("/api/v1/nope")
    assert set((await ours.json())["error"]) == {"code", "message", "details"}


async def test_without_a_node_the_request_waits_for_one_to_come_up(
    client: TestClient, web_settings: WebSettings
) -> None:
    _, secret = await make_user()
    body = {**BODY, "response_format": "b64_json"}
    answer = asyncio.ensure_future(client.post(IMAGES, json=body, headers=auth(secret)))
    assert web_settings.redis_url and web_settings.database_url
    async with jobs_context(web_settings.redis_url, web_settings.database_url) as ctx:
        node = NodeDouble(ctx)
        # Scaled from zero: the node appears after the request was queued.
        job = await node.claim()
        await node.announce()
        await node.run(job)
        response = await answer
    assert response.status == 200, await response.text()
    [image] = (await response.json())["data"]
    assert base64.b64decode(image["b64_json"]).startswith(b"\x89PNG")


async def test_a_failed_generation_is_502(client: TestClient, node: NodeDouble) -> None:
    _, secret = await make_user()
    task = asyncio.ensure_future(client.post(IMAGES, json=BODY, headers=auth(secret)))
    await node.fail(await node.claim(), "the GPU ran out of memory")
    response = await task
    assert response.status == 502
    body = await response.json()
    assert_openai_error(body, "generation_failed")
    assert "ran out of memory" in body["error"]["message"]


async def test_cancelled_while_waiting_is_410(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    task = asyncio.ensure_future(client.post(IMAGES, json=BODY, headers=auth(secret)))
    job = await node.claim()
    deleted = await client.delete(
        f"/api/v1/generations/{job.generation_id}", headers=auth(secret)
    )
    assert deleted.status == 204
    response = await task
    assert response.status == 410
    assert_openai_error(await response.json(), "gone")


async def test_too_slow_is_504_and_the_generation_is_cancelled(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(update={"openai_timeout": 0.3})
    client = await aiohttp_client(create_app(settings))
    assert settings.redis_url and settings.database_url
    async with jobs_context(settings.redis_url, settings.database_url) as ctx:
        await NodeDouble(ctx).announce()
        _, secret = await make_user()
        response = await client.post(IMAGES, json=BODY, headers=auth(secret))
    assert response.status == 504
    assert_openai_error(await response.json(), "timeout")
    [generation] = await Generation.all()
    assert generation.status is Status.CANCELLED


# --- regression tests of the review ---------------------------------------


async def test_finishing_just_as_the_wait_times_out_answers_the_images(
    aiohttp_client: Any, web_settings: WebSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import web.waiting as route

    settings = web_settings.model_copy(update={"openai_timeout": 0.5})
    client = await aiohttp_client(create_app(settings))
    assert settings.redis_url and settings.database_url
    async with jobs_context(settings.redis_url, settings.database_url) as ctx:
        node = NodeDouble(ctx)
        await node.announce()

        async def finishes_but_done_is_missed(app: Any, generation_id: Any) -> None:
            # The result is stored, but the timeout fires before `done` is seen.
            await node.run(await node.claim())
            # Never returning is what is tested: the route's wait times out.
            await asyncio.sleep(3600)

        monkeypatch.setattr(route, "wait_until_done", finishes_but_done_is_missed)
        _, secret = await make_user()
        response = await client.post(
            IMAGES, json={**BODY, "response_format": "b64_json"}, headers=auth(secret)
        )
    assert response.status == 200, await response.text()
    [generation] = await Generation.all()
    assert generation.status is Status.SUCCEEDED
    [item] = (await response.json())["data"]
    stored = await GeneratedImage.get(generation_id=generation.id)
    assert base64.b64decode(item["b64_json"]) == await stored_bytes(stored)

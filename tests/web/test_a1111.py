"""`/sdapi/v1/...`: the published A1111 client `webuiapi`, unchanged, against
the app on a real port (run in threads: it is synchronous), a node double
running the jobs; direct JSON for what the client does not send."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import pytest
import webuiapi
from aiohttp.test_utils import TestClient
from PIL import Image

from sdapi.contract.nodes import LoraOffer
from sdapi.contract.status import Status
from sdapi.db.models import Generation, InputImage, User
from sdapi.devtools.accounts import auth, make_user
from tests.image_support import stored_bytes
from tests.node_double import NodeDouble, node_info
from tests.support import until

TXT2IMG = "/sdapi/v1/txt2img"
SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}


def webui(client: TestClient, secret: str | None = None) -> webuiapi.WebUIApi:
    """The client as its README builds it (call in a thread: it connects)."""
    url = client.make_url("/sdapi/v1")
    api = webuiapi.WebUIApi(host=url.host, port=url.port)
    if secret is not None:
        # The username is not looked at: the token says who calls.
        api.set_auth("anyone", secret)
    return api


def png(color: tuple[int, int, int], size: int = 64) -> Image.Image:
    return Image.new("RGB", (size, size), color)


async def test_txt2img_with_basic_auth_gives_images_and_their_seeds(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    api = await asyncio.to_thread(webui, client, secret)
    call = asyncio.ensure_future(
        asyncio.to_thread(
            api.txt2img,
            prompt="a red fox",
            negative_prompt="blurry",
            width=64,
            height=64,
            steps=4,
            cfg_scale=6.5,
            seed=1234,
            batch_size=2,
            n_iter=2,
            sampler_name="Euler a",
        )
    )
    job = await node.claim()
    params = job.params
    assert (params.num_images, params.seed, params.scheduler) == (4, 1234, "euler_a")
    assert (params.guidance_scale, params.negative_prompt) == (6.5, "blurry")
    await node.run(job)
    result = await call
    assert len(result.images) == 4
    assert all(image.size == (64, 64) for image in result.images)
    assert result.info["seed"] == 1234
    assert result.info["all_seeds"] == [1234, 1235, 1236, 1237]
    assert len(result.info["all_subseeds"]) == 4
    assert result.info["sampler_name"] == "Euler a"
    assert result.info["infotexts"][3].splitlines()[0] == "a red fox"
    assert "Seed: 1237" in result.info["infotexts"][3]
    assert result.parameters["prompt"] == "a red fox"
    assert result.parameters["batch_size"] == 2


async def test_random_seed_is_reported_and_repeats(
    client: TestClient, node: NodeDouble
) -> None:
    user = await make_user()
    first = client.post(TXT2IMG, json={**SMALL, "seed": -1}, headers=user.headers)
    task = asyncio.ensure_future(first)
    job = await node.claim()
    await node.run(job)
    body = await (await task).json()
    info = json.loads(body["info"])
    assert info["seed"] == job.params.seed
    again = asyncio.ensure_future(
        client.post(TXT2IMG, json={**SMALL, "seed": info["seed"]}, headers=user.headers)
    )
    repeat = await node.claim()
    assert repeat.params.image_seeds() == job.params.image_seeds()
    await node.run(repeat)
    assert (await (await again).json())["images"] == body["images"]


async def test_model_sampler_and_lora_lists(
    client: TestClient, node: NodeDouble
) -> None:
    lora = LoraOffer(name="ink", kind="tiny", trigger_words=["inked"], sha256="ab" * 32)
    await NodeDouble(
        node.ctx, node_info(node_id="double-2", model="tiny2", loras=[lora])
    ).announce()
    _, secret = await make_user()
    api = await asyncio.to_thread(webui, client, secret)
    assert await asyncio.to_thread(api.util_get_model_names) == ["tiny", "tiny2"]
    [model, _] = await asyncio.to_thread(api.get_sd_models)
    assert model == {
        "title": "tiny",
        "model_name": "tiny",
        "hash": None,
        "sha256": None,
        "filename": "tiny",
        "config": None,
    }
    samplers = await asyncio.to_thread(api.get_samplers)
    assert [s["name"] for s in samplers] == ["Euler a", "Euler", "DDIM"]
    assert samplers[0]["aliases"] == ["k_euler_a", "k_euler_ancestral"]
    [item] = await asyncio.to_thread(api.get_loras)
    assert (item["name"], item["metadata"]["trigger_words"]) == ("ink", ["inked"])


async def test_options_set_only_the_callers_default_model(
    client: TestClient, node: NodeDouble
) -> None:
    await NodeDouble(node.ctx, node_info(node_id="double-2", model="tiny2")).announce()
    me, other = await make_user(), await make_user()
    api = await asyncio.to_thread(webui, client, me.secret)
    options = await asyncio.to_thread(api.get_options)
    assert options["sd_model_checkpoint"] == "tiny"
    assert options["samples_format"] == "png"
    assert (
        await asyncio.to_thread(api.set_options, {"sd_model_checkpoint": "tiny2"}) == {}
    )
    assert (await User.get(id=me.user.id)).default_model == "tiny2"
    assert await asyncio.to_thread(api.util_get_current_model) == "tiny2"
    # Everyone else keeps the service's default.
    theirs = await client.get("/sdapi/v1/options", headers=other.headers)
    assert (await theirs.json())["sd_model_checkpoint"] == "tiny"
    # /api/v1 uses it too when a request names no model.
    made = await client.post(
        "/api/v1/generations", json={"prompt": "a fox"}, headers=me.headers
    )
    assert (await made.json())["request"]["model"] == "tiny2"
    # override_settings picks the model of one request.
    task = asyncio.ensure_future(
        client.post(
            TXT2IMG,
            json={**SMALL, "override_settings": {"sd_model_checkpoint": "tiny"}},
            headers=me.headers,
        )
    )
    job = await node.claim()
    assert job.model == "tiny"
    await node.run(job)
    assert (await task).status == 200
    refused = await client.post(
        "/sdapi/v1/options",
        json={"sd_model_checkpoint": "nope", "CLIP_stop_at_last_layers": 1},
        headers=me.headers,
    )
    assert refused.status == 404
    assert "nope" in (await refused.json())["detail"]
    changed = await client.post(
        "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}, headers=me.headers
    )
    assert changed.status == 422
    [detail] = (await changed.json())["detail"]
    assert detail["loc"] == ["body", "CLIP_stop_at_last_layers"]


async def test_img2img_inpainting_blurs_and_inverts_the_mask(
    client: TestClient, node: NodeDouble
) -> None:
    me = await make_user()
    api = await asyncio.to_thread(webui, client, me.secret)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    call = asyncio.ensure_future(
        asyncio.to_thread(
            api.img2img,
            images=[png((200, 30, 30))],
            mask_image=mask,
            prompt="a blue square",
            denoising_strength=0.5,
            inpainting_fill=1,
            inpaint_full_res=False,
            inpainting_mask_invert=1,
            mask_blur=3,
            width=64,
            height=64,
            steps=4,
            seed=9,
        )
    )
    job = await node.claim()
    assert job.params.strength == 0.5
    assert job.params.mask_sha256 is not None
    stored = await InputImage.get(sha256=job.params.mask_sha256)
    with Image.open(io.BytesIO(await stored_bytes(stored))) as sent:
        # Inverted: the square is kept, the rest repainted; blurred edges.
        assert sent.getpixel((32, 32)) == 0
        assert sent.getpixel((2, 2)) == 255
        assert 0 < sent.getpixel((16, 32)) < 255
    await node.run(job)
    result = await call
    assert len(result.images) == 1
    assert result.parameters["init_images"] is None
    assert result.info["denoising_strength"] == 0.5
    assert result.info["is_using_inpainting_conditioning"] is True


async def test_progress_and_interrupt_concern_the_callers_own_work(
    client: TestClient, node: NodeDouble
) -> None:
    me, other = await make_user(), await make_user()
    api = await asyncio.to_thread(webui, client, me.secret)
    idle = await asyncio.to_thread(api.get_progress)
    assert (idle["progress"], idle["state"]["job_count"]) == (0, 0)
    call = asyncio.ensure_future(
        asyncio.to_thread(
            api.txt2img, prompt="a slow fox", width=64, height=64, steps=8
        )
    )
    job = await node.claim()
    await node.start(job)
    for step in (1, 2):
        await node.progress(job, step)
    shown = await asyncio.to_thread(api.get_progress)
    assert shown["progress"] == pytest.approx(2 / 8)
    assert shown["eta_relative"] >= 0
    assert shown["state"]["sampling_step"] == 2
    assert shown["state"]["sampling_steps"] == 8
    assert shown["state"]["job_count"] == 1
    assert shown["state"]["job"] == str(job.generation_id)
    assert shown["current_image"] == "/9j/"
    theirs = await client.get("/sdapi/v1/progress", headers=other.headers)
    assert (await theirs.json())["state"]["job_count"] == 0
    # Someone else's interrupt stops nothing of mine.
    assert (
        await client.post("/sdapi/v1/interrupt", headers=other.headers)
    ).status == 200
    generation = await Generation.get(id=job.generation_id)
    assert generation.status == Status.RUNNING
    assert await asyncio.to_thread(api.interrupt) == {}
    with pytest.raises(RuntimeError) as caught:
        await call
    assert caught.value.args[0] == 410
    await generation.refresh_from_db()
    assert generation.status == Status.CANCELLED


async def test_errors_use_a1111_shapes(client: TestClient, node: NodeDouble) -> None:
    me = await make_user()
    normal = await make_user(premium=False)
    anonymous = await client.post(TXT2IMG, json=SMALL)
    assert anonymous.status == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
    body = await anonymous.json()
    assert set(body) == {"error", "detail", "body", "errors", "code"}
    wrong = base64.b64encode(b"me:not-a-token").decode()
    assert (
        await client.post(
            TXT2IMG, json=SMALL, headers={"Authorization": f"Basic {wrong}"}
        )
    ).status == 401
    refused = await client.post(TXT2IMG, json=SMALL, headers=normal.headers)
    assert refused.status == 403
    assert (await refused.json())["code"] == "premium_required"
    unknown = await client.post(
        TXT2IMG, json={**SMALL, "sampler_name": "Heun++"}, headers=me.headers
    )
    assert unknown.status == 404
    assert "Heun++" in (await unknown.json())["detail"]
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"enable_hr": True}, ["enable_hr"]),
        ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, ["alwayson_scripts"]),
        ({"restore_faces": True}, ["restore_faces"]),
        ({"subseed_strength": 0.5}, ["subseed_strength"]),
        (
            {"override_settings": {"CLIP_stop_at_last_layers": 2}},
            ["override_settings", "CLIP_stop_at_last_layers"],
        ),
        ({"sampler_name": "Euler a", "eta": 0.5}, ["eta"]),
        ({"scheduler": "exponential"}, ["scheduler"]),
        ({"width": 60}, ["width"]),
        ({"batch_size": 3, "n_iter": 3}, ["batch_size"]),
    ]
    for fields, loc in cases:
        answer = await client.post(
            TXT2IMG, json={**SMALL, **fields}, headers=me.headers
        )
        assert answer.status == 422, fields
        detail = (await answer.json())["detail"]
        assert ["body", *loc] in [item["loc"] for item in detail], detail
        assert all(set(item) == {"loc", "msg", "type"} for item in detail)
    # A1111's inpainting defaults ask for what the pipeline does not do.
    img2img = {
        **SMALL,
        "init_images": ["aGk="],
        "mask": "aGk=",
        "inpainting_fill": 0,
        "inpaint_full_res": True,
    }
    answer = await client.post("/sdapi/v1/img2img", json=img2img, headers=me.headers)
    assert answer.status == 422
    locs = [item["loc"] for item in (await answer.json())["detail"]]
    assert locs == [["body", "inpainting_fill"], ["body", "inpaint_full_res"]]
    two = {**SMALL, "init_images": ["aGk=", "aGk="]}
    answer = await client.post("/sdapi/v1/img2img", json=two, headers=me.headers)
    assert answer.status == 422
    assert (await answer.json())["detail"][0]["loc"] == ["body", "init_images"]
    # Values that change nothing are accepted, unknown fields ignored and named.
    task = asyncio.ensure_future(
        client.post(
            TXT2IMG,
            json={
                **SMALL,
                "restore_faces": False,
                "tiling": False,
                "save_images": True,
                "script_args": [],
                "eta": 1.0,
                "sampler_name": "k_euler_a",
                "hr_scale": 4,
                "denoising_strength": 0.2,
                "controlnet_units": [],
                "my_field": 1,
            },
            headers=me.headers,
        )
    )
    await node.run(await node.claim())
    answer = await task
    assert answer.status == 200
    assert answer.headers["X-Sdapi-Ignored-Fields"] == "controlnet_units, my_field"
    assert "my_field" not in (await answer.json())["parameters"]


async def test_a_client_that_hangs_up_cancels_its_generation(
    client: TestClient, node: NodeDouble
) -> None:
    me = await make_user()
    task = asyncio.ensure_future(
        client.post(TXT2IMG, json=SMALL, headers=auth(me.secret))
    )
    job = await node.claim()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def cancelled() -> bool:
        row = await Generation.get(id=job.generation_id)
        return row.status == Status.CANCELLED

    await until(cancelled, 10, "the generation cancelled")


async def test_the_routes_are_in_the_openapi_document(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    routes = {
        (method.upper(), path): operation
        for path, item in document["paths"].items()
        if path.startswith("/sdapi/v1/")
        for method, operation in item.items()
    }
    assert set(routes) == {
        ("POST", "/sdapi/v1/txt2img"),
        ("POST", "/sdapi/v1/img2img"),
        ("GET", "/sdapi/v1/progress"),
        ("POST", "/sdapi/v1/interrupt"),
        ("GET", "/sdapi/v1/sd-models"),
        ("GET", "/sdapi/v1/samplers"),
        ("GET", "/sdapi/v1/loras"),
        ("GET", "/sdapi/v1/options"),
        ("POST", "/sdapi/v1/options"),
    }
    for operation in routes.values():
        assert operation["tags"] == ["automatic1111"]
        assert operation["security"] == [{"basic": []}, {"bearer": []}]
    assert document["components"]["securitySchemes"]["basic"]["scheme"] == "basic"

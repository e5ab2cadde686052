"""`POST /v1/images/edits`: OpenAI's inpainting through the official client."""

from __future__ import annotations

import asyncio
import base64
import io
import uuid
from typing import Any

import numpy as np
from aiohttp.test_utils import TestClient
from PIL import Image

from sdapi.contract.names import input_key
from sdapi.db.models import GeneratedImage, Generation
from sdapi.devtools.accounts import auth, make_user
from tests.image_support import stored_bytes
from tests.node_double import NodeDouble

EDITS = "/v1/images/edits"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")


def alpha_mask(size: int = 64) -> Image.Image:
    """OpenAI's mask: opaque everywhere but a transparent square to repaint."""
    rgba = np.full((size, size, 4), 255, dtype=np.uint8)
    rgba[16:48, 16:48, 3] = 0
    return Image.fromarray(rgba, mode="RGBA")


async def test_images_edit_through_the_official_client(
    client: TestClient, node: NodeDouble
) -> None:
    import openai

    _, secret = await make_user()
    api = openai.AsyncOpenAI(
        api_key=secret, base_url=str(client.make_url("/v1")), max_retries=0
    )
    call = api.images.edit(
        image=("photo.png", png(photo()), "image/png"),
        mask=("mask.png", png(alpha_mask()), "image/png"),
        prompt="a red fox",
        model="tiny",
        n=2,
        size="64x64",
        response_format="b64_json",
    )
    task = asyncio.ensure_future(call)
    job = await node.claim()
    assert job.params.mode == "inpaint"
    assert job.params.strength == 1.0
    assert job.params.num_images == 2
    # Transparent pixels became white (repaint), opaque ones black (keep).
    data = await node.redis.get(input_key(job.params.mask_sha256 or ""))
    mask = np.asarray(Image.open(io.BytesIO(data)))
    assert mask[20, 20] == 255 and mask[2, 2] == 0
    assert int(mask.sum()) == 32 * 32 * 255
    await node.run(job)
    response = await task
    await api.close()
    [generation] = await Generation.all()
    stored = await GeneratedImage.filter(generation_id=generation.id).order_by("index")
    assert [base64.b64decode(item.b64_json or "") for item in response.data] == [
        await stored_bytes(image) for image in stored
    ]


async def test_without_a_mask_the_images_transparency_is_the_mask(
    client: TestClient, node: NodeDouble
) -> None:
    import openai

    _, secret = await make_user()
    api = openai.AsyncOpenAI(
        api_key=secret, base_url=str(client.make_url("/v1")), max_retries=0
    )
    holed = photo().convert("RGBA")
    holed.putalpha(alpha_mask().getchannel("A"))
    task = asyncio.ensure_future(
        api.images.edit(image=("holed.png", png(holed)), prompt="a fox", model="tiny")
    )
    job = await node.claim()
    assert job.params.mode == "inpaint"
    # No size: the image's own.
    assert (job.params.width, job.params.height) == (64, 64)
    await node.run(job)
    response = await task
    assert response.data[0].url
    # An opaque image without a mask is redrawn as a whole (img2img).
    task = asyncio.ensure_future(
        api.images.edit(image=("photo.png", png(photo())), prompt="a fox")
    )
    job = await node.claim()
    assert job.params.mode == "img2img" and job.params.strength == 0.8
    await node.run(job)
    await task
    await api.close()


async def form_post(
    client: TestClient, secret: str, fields: dict[str, Any], **headers: str
) -> tuple[int, dict[str, Any]]:
    import aiohttp

    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        if isinstance(value, bytes):
            form.add_field(name, io.BytesIO(value), filename=f"{name}.png")
        else:
            form.add_field(name, str(value))
    response = await client.post(EDITS, data=form, headers={**auth(secret), **headers})
    return response.status, await response.json()


async def test_bad_edits_answer_in_openais_error_shape(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    status, body = await form_post(
        client,
        secret,
        {"image": png(photo()), "mask": png(alpha_mask(32)), "prompt": "a fox"},
    )
    assert status == 400 and body["error"]["param"] == "mask"
    # A mask without alpha cannot say what to repaint.
    status, body = await form_post(
        client, secret, {"image": png(photo()), "mask": png(photo()), "prompt": "x"}
    )
    assert status == 400 and "alpha" in body["error"]["message"]
    status, body = await form_post(client, secret, {"image": b"GIF89a", "prompt": "x"})
    assert status == 400 and body["error"]["param"] == "image", body
    status, body = await form_post(client, secret, {"prompt": "no image"})
    assert status == 400 and body["error"]["param"] == "image"
    _, normal = await make_user(premium=False)
    status, body = await form_post(
        client, normal, {"image": png(photo()), "prompt": "x"}
    )
    assert status == 403 and body["error"]["code"] == "premium_required"
    assert await Generation.all().count() == 0


async def test_a_retried_edit_with_the_same_key_answers_the_same(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    fields = {"image": png(photo()), "prompt": "a fox", "response_format": "b64_json"}
    key = "edit-" + uuid.uuid4().hex
    first = asyncio.ensure_future(
        form_post(client, secret, fields, **{"Idempotency-Key": key})
    )
    await node.run(await node.claim())
    status, body = await first
    assert status == 200
    again = await form_post(client, secret, fields, **{"Idempotency-Key": key})
    assert again == (200, body)
    assert await Generation.all().count() == 1
    status, conflict = await form_post(
        client, secret, {**fields, "prompt": "a cat"}, **{"Idempotency-Key": key}
    )
    assert status == 409 and conflict["error"]["code"] == "conflict"


async def test_an_edit_takes_images_over_the_api_body_limit(
    client: TestClient, node: NodeDouble
) -> None:
    """An image of a few MB is a normal edit: the route's own upload limit
    applies, not the API's 1 MiB for JSON bodies."""
    import openai

    _, secret = await make_user()
    rng = np.random.default_rng(11)
    noise = Image.fromarray(rng.integers(0, 256, (704, 704, 3), dtype=np.uint8))
    image = png(noise)
    assert len(image) > 1024 * 1024
    api = openai.AsyncOpenAI(
        api_key=secret, base_url=str(client.make_url("/v1")), max_retries=0
    )
    call = api.images.edit(
        image=("photo.png", image, "image/png"),
        prompt="a red fox",
        model="tiny",
        size="64x64",
        response_format="b64_json",
    )
    task = asyncio.ensure_future(call)
    job = await node.claim()
    assert job.params.mode == "img2img"
    await node.run(job)
    response = await task
    await api.close()
    assert len(response.data) == 1

"""Image inputs on REST submit: forms they come in, checks, storage, idempotency."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
from aiohttp.test_utils import TestClient
from PIL import Image

from sdapi.contract.names import input_key
from sdapi.db.models import Generation, GenerationInput, IdempotencyKey, InputImage
from sdapi.devtools.accounts import auth, make_user
from tests.node_double import NodeDouble
from web.app import create_app
from web.appkeys import decoders_key
from web.settings import WebSettings

GENERATIONS = "/api/v1/generations"
BASE = {"prompt": "a red fox", "steps": 4}


def encode(image: Image.Image, kind: str = "PNG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def picture(width: int = 64, height: int = 64) -> Image.Image:
    rng = np.random.default_rng(width * 1000 + height)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def square_mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[8:40, 8:40] = 255
    return Image.fromarray(mask, mode="L")


async def post(
    client: TestClient,
    secret: str,
    body: dict[str, Any],
    status: int = 202,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    # A stream: aiohttp warns about large bodies given as bytes.
    response = await client.post(
        GENERATIONS,
        data=io.BytesIO(json.dumps(body).encode()),
        headers={
            **auth(secret),
            "Content-Type": "application/json",
            **(headers or {}),
        },
    )
    data: dict[str, Any] = await response.json()
    assert response.status == status, data
    return data


def declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels."""
    png = bytearray(encode(Image.new("L", (8, 8))))
    png[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    return bytes(png)


def refused(data: dict[str, Any], field: str, code: str = "validation_error") -> str:
    assert data["error"]["code"] == code, data
    assert data["error"]["details"][0]["field"] == field, data
    message: str = data["error"]["details"][0]["message"]
    return message


async def test_img2img_by_base64_stores_the_input_once_and_hands_it_over_by_hash(
    client: TestClient, node: NodeDouble
) -> None:
    user, secret = await make_user()
    source = encode(picture(100, 84))
    body = await post(
        client, secret, {**BASE, "init_image": b64(source), "strength": 0.5}
    )
    request = body["request"]
    # The input's size, in multiples of 8.
    assert (request["width"], request["height"]) == (96, 80)
    assert request["strength"] == 0.5
    digest = request["init_image_sha256"]
    assert request["mask_sha256"] is None
    job = await node.claim()
    assert job.params.init_image_sha256 == digest
    assert job.params.strength == 0.5
    assert job.params.denoising_steps == 2
    stored = await node.redis.get(input_key(digest))
    assert hashlib.sha256(stored).hexdigest() == digest
    # The same image again (as a data: URL) is not stored twice.
    again = await post(
        client,
        secret,
        {**BASE, "init_image": "data:image/png;base64," + b64(source)},
    )
    assert again["request"]["init_image_sha256"] == digest
    assert again["request"]["strength"] == 0.8
    assert await InputImage.filter(user_id=user.id).count() == 1
    assert await GenerationInput.filter(image__user_id=user.id).count() == 2


async def test_inpainting_as_multipart_form_data(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    form = aiohttp.FormData()
    form.add_field("prompt", "a red fox")
    form.add_field("steps", "4")
    form.add_field("num_images", "2")
    form.add_field("init_image", io.BytesIO(encode(picture())), filename="photo.png")
    # Named .png, but a JPEG: recognised by content.
    form.add_field(
        "mask", io.BytesIO(encode(square_mask(), "JPEG")), filename="mask.png"
    )
    response = await client.post(GENERATIONS, data=form, headers=auth(secret))
    body = await response.json()
    assert response.status == 202, body
    request = body["request"]
    assert request["num_images"] == 2
    job = await node.claim()
    assert job.params.mode == "inpaint"
    assert job.params.mask_sha256 == request["mask_sha256"]
    mask = Image.open(
        io.BytesIO(await node.redis.get(input_key(request["mask_sha256"])))
    )
    assert mask.mode == "L" and mask.size == (64, 64)


async def test_an_own_result_can_be_the_input_and_no_one_elses(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    first = await post(client, secret, {**BASE, "width": 64, "height": 64})
    job = await node.claim()
    await node.run(job)
    reference = {"generation_id": first["id"], "index": 0}
    body = await post(client, secret, {**BASE, "init_image": reference})
    png = await (
        await client.get(f"{GENERATIONS}/{first['id']}/images/0", headers=auth(secret))
    ).read()
    # The stored input is the result's pixels without its text chunks.
    with Image.open(io.BytesIO(png)) as result:
        assert result.text
        expected = np.asarray(result.convert("RGB"))
    digest = body["request"]["init_image_sha256"]
    await node.claim()
    with Image.open(io.BytesIO(await node.redis.get(input_key(digest)))) as kept:
        assert not getattr(kept, "text", {})
        assert np.array_equal(np.asarray(kept), expected)
    _, other = await make_user()
    data = await post(client, other, {**BASE, "init_image": reference}, 422)
    missing = {"generation_id": str(uuid.uuid4()), "index": 0}
    data_missing = await post(client, other, {**BASE, "init_image": missing}, 422)
    # Someone else's image reads exactly like one that does not exist.
    assert refused(data, "init_image") == refused(data_missing, "init_image")


async def test_every_kind_of_bad_upload_is_refused_clearly(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user(premium=False)
    good = b64(encode(picture()))

    async def refusal(
        body: dict[str, Any], field: str, status: int = 422, code: str = ""
    ) -> str:
        data = await post(client, secret, {**BASE, **body}, status)
        return refused(data, field, code or "validation_error")

    assert "PNG, JPEG or WebP" in await refusal(
        {"init_image": b64(encode(picture(), "GIF"))}, "init_image"
    )
    assert "PNG, JPEG or WebP" in await refusal(
        {"init_image": b64(b"just some text")}, "init_image"
    )
    assert "base64" in await refusal({"init_image": "%%%"}, "init_image")
    # A normal-tier upload over 4 MiB: 413, before anything is decoded.
    assert "bytes" in await refusal(
        {"init_image": b64(b"\x89PNG\r\n\x1a\n" + bytes(4 * 1024 * 1024))},
        "init_image",
        413,
        "payload_too_large",
    )
    # 25 megapixels of zeros compress to a few KB: refused from the header.
    bomb = encode(Image.new("L", (5000, 5000)))
    assert len(bomb) < 100_000
    assert "pixels" in await refusal({"init_image": b64(bomb)}, "init_image")
    # A header claiming 30000x30000 pixels: Pillow's own limit refuses it.
    giant = declaring(30000, 30000)
    assert "too large" in await refusal({"init_image": b64(giant)}, "init_image")
    frames = [picture(), Image.new("RGB", (64, 64), (255, 0, 0))]
    animated = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:])
    assert "Animated" in await refusal({"init_image": b64(animated)}, "init_image")
    deep = Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16))
    assert "16-bit" in await refusal({"init_image": b64(encode(deep))}, "init_image")
    truncated = encode(picture())[:200]
    assert "decoded" in await refusal({"init_image": b64(truncated)}, "init_image")
    small_mask = b64(encode(square_mask(32, 32)))
    assert "64x64" in await refusal({"init_image": good, "mask": small_mask}, "mask")
    assert "init_image" in await refusal({"mask": good}, "mask")
    assert "init_image" in await refusal({"strength": 0.5}, "strength")
    await refusal({"init_image": good, "strength": 1.5}, "strength")
    # An unverified account is told to verify, whatever its upload.
    _, unverified = await make_user(premium=False, verified=False)
    data = await post(client, unverified, {**BASE, "init_image": "%%%"}, 403)
    assert data["error"]["code"] == "email_not_verified"
    assert await Generation.all().count() == 0


async def test_cmyk_is_converted_and_exif_dropped_with_its_orientation_applied(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    cmyk = encode(Image.new("CMYK", (64, 32), (0, 255, 255, 0)), "JPEG")
    body = await post(client, secret, {**BASE, "init_image": b64(cmyk)})
    await node.claim()
    kept = Image.open(
        io.BytesIO(
            await node.redis.get(input_key(body["request"]["init_image_sha256"]))
        )
    )
    assert kept.mode == "RGB"
    red, green, blue = kept.getpixel((10, 10))  # type: ignore[misc]
    assert red > 200 and green < 60 and blue < 60
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    exif[0x010F] = "SecretCam"  # Make
    photo = encode(picture(64, 32), "JPEG", exif=exif.tobytes())
    body = await post(client, secret, {**BASE, "init_image": b64(photo)})
    # Upright, the photo is 32 wide and 64 high: the default size follows
    # (raised to the smallest width, 64).
    assert (body["request"]["width"], body["request"]["height"]) == (64, 64)
    await node.claim()
    data = await node.redis.get(input_key(body["request"]["init_image_sha256"]))
    assert b"SecretCam" not in data and b"Exif" not in data
    with Image.open(io.BytesIO(data)) as upright:
        assert upright.size == (32, 64)
        assert not upright.getexif()


async def test_a_retried_submit_with_the_same_key_makes_one_generation(
    client: TestClient, node: NodeDouble
) -> None:
    user, secret = await make_user()
    body = {**BASE, "init_image": b64(encode(picture())), "num_images": 3}
    key = {"Idempotency-Key": "retry-" + uuid.uuid4().hex}
    first = await post(client, secret, body, headers=key)
    second = await post(client, secret, body, headers=key)
    assert second["id"] == first["id"]
    assert await Generation.filter(user_id=user.id).count() == 1
    assert await IdempotencyKey.filter(user_id=user.id).count() == 1
    await node.claim()
    me = await (await client.get("/api/v1/me", headers=auth(secret))).json()
    assert me["quota"]["images_today"] == 3
    assert me["quota"]["max_upload_bytes"] == 16 * 1024 * 1024
    assert me["quota"]["max_upload_pixels"] == 4096 * 4096
    other_body = {**body, "prompt": "a blue fox"}
    conflict = await post(client, secret, other_body, 409, headers=key)
    assert conflict["error"]["code"] == "conflict"
    # Another user's identical key is theirs alone.
    _, other = await make_user()
    theirs = await post(client, other, body, headers=key)
    assert theirs["id"] != first["id"]
    # A new key is a new generation.
    fresh = {"Idempotency-Key": "retry-" + uuid.uuid4().hex}
    assert (await post(client, secret, body, headers=fresh))["id"] != first["id"]
    bad = await post(client, secret, body, 422, headers={"Idempotency-Key": ""})
    assert refused(bad, "Idempotency-Key")


async def test_the_openapi_document_describes_image_inputs(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    submit = document["paths"]["/api/v1/generations"]["post"]
    assert set(submit["requestBody"]["content"]) == {
        "application/json",
        "multipart/form-data",
    }
    assert "Idempotency-Key" in [p["name"] for p in submit["parameters"]]
    request = document["components"]["schemas"]["GenerationRequest"]["properties"]
    assert {"init_image", "mask", "strength"} <= set(request)
    assert "ImageReference" in document["components"]["schemas"]
    edits = document["paths"]["/v1/images/edits"]["post"]
    assert set(edits["requestBody"]["content"]) == {"multipart/form-data"}
    edit = document["components"]["schemas"]["ImageEditRequest"]
    assert edit["properties"]["image"]["format"] == "binary"
    assert set(edit["required"]) == {"image", "prompt"}


async def test_a_form_may_name_an_earlier_result_but_not_twice_the_same_input(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    first = await post(client, secret, {**BASE, "width": 64, "height": 64})
    await node.run(await node.claim())
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("prompt", "the same fox, at night")
    form.add_field("strength", "0.4")
    form.add_field("init_image", json.dumps({"generation_id": first["id"], "index": 0}))
    response = await client.post(GENERATIONS, data=form, headers=auth(secret))
    body = await response.json()
    assert response.status == 202, body
    assert body["request"]["strength"] == 0.4
    assert (await node.claim()).params.init_image_sha256
    both = aiohttp.FormData()
    both.add_field("prompt", "a fox")
    both.add_field("init_image", b64(encode(picture())))
    both.add_field("init_image", io.BytesIO(encode(picture())), filename="a.png")
    response = await client.post(GENERATIONS, data=both, headers=auth(secret))
    assert response.status == 422
    assert refused(await response.json(), "init_image")


# --- finding 6: decoding after the quota check, bounded, shared fairly -------


async def test_decoding_waits_for_the_quota_check(
    aiohttp_client: Callable[..., Any], web_settings: WebSettings, node: NodeDouble
) -> None:
    settings = web_settings.model_copy(
        update={"premium_images_per_day": 2, "premium_max_in_flight": 1}
    )
    client: TestClient = await aiohttp_client(create_app(settings))
    decoders = client.app[decoders_key]
    upload = {**BASE, "init_image": b64(encode(picture()))}
    _, spent = await make_user()
    await post(client, spent, {**BASE, "num_images": 2})
    data = await post(client, spent, upload, 429)
    assert data["error"]["code"] == "quota_exceeded"
    _, busy = await make_user()
    await post(client, busy, BASE)
    data = await post(client, busy, upload, 429)
    assert data["error"]["code"] == "rate_limited"
    # Neither refused upload was decoded; an accepted one is.
    assert decoders.started == 0
    _, fresh = await make_user()
    await post(client, fresh, upload)
    assert decoders.started == 1


async def test_an_image_declaring_too_many_pixels_is_refused_without_decoding(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    # 25 megapixels declared in 8x8 pixels' bytes; premium accepts 16.
    data = await post(
        client, secret, {**BASE, "init_image": b64(declaring(5000, 5000))}, 422
    )
    assert "pixels" in refused(data, "init_image")
    assert client.app[decoders_key].started == 0


async def test_one_user_holds_at_most_their_share_of_the_decoders(
    aiohttp_client: Callable[..., Any], web_settings: WebSettings, node: NodeDouble
) -> None:
    settings = web_settings.model_copy(
        update={"decode_workers": 2, "decode_per_user": 1, "decode_wait": 0.3}
    )
    client: TestClient = await aiohttp_client(create_app(settings))
    decoders = client.app[decoders_key]
    greedy, greedy_secret = await make_user()
    _, other_secret = await make_user()
    upload = {**BASE, "init_image": b64(encode(picture()))}
    # As while one of their uploads is being decoded.
    async with decoders.slot(greedy.id):
        response = await client.post(
            GENERATIONS, json=upload, headers=auth(greedy_secret)
        )
        assert response.status == 429
        assert (await response.json())["error"]["code"] == "rate_limited"
        assert int(response.headers["Retry-After"]) > 0
        # Someone else's upload still has a thread.
        await post(client, other_secret, upload)
    await post(client, greedy_secret, upload)
    assert decoders.started == 2

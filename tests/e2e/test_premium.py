"""The premium tier end to end: `sdapi web`, `sdapi jobs` and a `tiny`
`sdapi gpu-node` as real processes on real PostgreSQL and Valkey, an aiosmtpd
server catching mail, and clients speaking WebSocket, REST and OpenAI."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiosmtpd.controller import Controller
from PIL import Image

from sdapi.db.connection import open_database, truncate_all
from sdapi.devtools.accounts import make_user
from sdapi.devtools.net import free_port
from tests.e2e.conftest import (
    Mailbox,
    Service,
    Services,
    node_env,
    own_redis_db,
    sdapi_env,
    start_services,
)
from tests.support import until

pytestmark = pytest.mark.slow

NODE_ID = "e2e-premium-node"
# A Valkey database of the suite's server, apart from the unit tests' 0.
REDIS_DB = 14
SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 6}


@dataclass
class Stack:
    base_url: str
    redis_url: str
    services: Services
    mailbox: Mailbox

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/api/v1/ws"


@contextlib.contextmanager
def premium_stack(
    database_url: str,
    redis_url: str,
    e2e_model_dir: Path,
    root: Path,
    *,
    redis_db: int,
    env: dict[str, str] | None = None,
    **settings: object,
) -> Iterator[Stack]:
    """web, jobs and a tiny gpu-node, with SDAPI_* `settings` and `env` (an
    image store's credentials, say) for web and jobs: the node never gets
    storage settings or credentials, it reads and writes images via Redis."""
    own_redis = own_redis_db(redis_url, redis_db)
    asyncio.run(truncate_all(database_url))
    mailbox = Mailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    common: dict[str, object] = {
        "database_url": database_url,
        "redis_url": own_redis,
        "data_dir": root / "data",
        "secret_key": "e2e-secret-key",
        "public_url": base_url,
    }
    extra = env or {}
    services = Services()
    services.add(
        Service(
            "web", "web", {**sdapi_env(**common, **settings, port=port), **extra}, root
        )
    )
    services.add(
        Service(
            "jobs",
            "jobs",
            {
                **sdapi_env(
                    **common,
                    **settings,
                    smtp_url=f"smtp://127.0.0.1:{smtp.port}",
                    outbox_interval=0.2,
                ),
                **extra,
            },
            root,
        )
    )
    node = node_env(
        common,
        e2e_model_dir,
        NODE_ID,
        gpu_preview_every=2,
        # Every step, so the test can check each one arrives in order.
        gpu_progress_interval_s=0,
    )
    node = {k: v for k, v in node.items() if not k.startswith("AWS_")}
    services.add(Service("gpu-node", "gpu-node", node, root))
    try:
        start_services(services, base_url, own_redis)
        yield Stack(base_url, own_redis, services, mailbox)
    finally:
        services.stop()
        smtp.stop()


@pytest.fixture(scope="module")
def stack(
    database_url: str,
    redis_url: str,
    e2e_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    with premium_stack(
        database_url,
        redis_url,
        e2e_model_dir,
        tmp_path_factory.mktemp("premium-e2e"),
        redis_db=REDIS_DB,
    ) as found:
        yield found


def png_chunks(data: bytes) -> dict[str, list[bytes]]:
    """A PNG's chunks by type, each type's data in file order."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: dict[str, list[bytes]] = {}
    position = 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8].decode("ascii")
        chunks.setdefault(kind, []).append(data[position + 8 : position + 8 + length])
        position += 12 + length
    return chunks


def text_chunk(chunks: dict[str, list[bytes]], key: str) -> bytes:
    """The raw tEXt/iTXt chunk whose keyword is `key`."""
    for data in chunks.get("tEXt", []) + chunks.get("iTXt", []):
        if data.split(b"\0", 1)[0] == key.encode():
            return data
    raise AssertionError(f"no {key} text chunk")


@dataclass
class Client:
    http: aiohttp.ClientSession
    auth: dict[str, str]
    stack: Stack

    async def frames_until_done(
        self, ws: aiohttp.ClientWebSocketResponse, ident: str, timeout: float = 60
    ) -> list[dict[str, Any]]:
        frames = []
        async with asyncio.timeout(timeout):
            while True:
                message = await ws.receive()
                assert message.type is aiohttp.WSMsgType.TEXT, message
                frame: dict[str, Any] = message.json()
                if frame.get("id") != ident:
                    continue
                frames.append(frame)
                if frame["type"] == "done":
                    return frames

    async def generate(
        self, request: dict[str, Any]
    ) -> tuple[dict[str, Any], list[Any]]:
        """Generate over a WebSocket: the `accepted` frame and every frame after."""
        async with self.http.ws_connect(self.stack.ws_url, headers=self.auth) as ws:
            await ws.send_json({"type": "generate", "request": request})
            accepted = await ws.receive_json(timeout=30)
            assert accepted["type"] == "accepted", accepted
            return accepted, await self.frames_until_done(ws, accepted["id"])

    async def download(self, ident: str, index: int = 0) -> bytes:
        path = f"/api/v1/generations/{ident}/images/{index}"
        async with self.http.get(path, headers=self.auth) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "image/png"
            return await response.read()


@pytest.fixture
async def client(stack: Stack, database_url: str) -> AsyncIterator[Client]:
    async with open_database(database_url, pool_size=1):
        auth = (await make_user(premium=True)).headers
    async with aiohttp.ClientSession(base_url=stack.base_url) as http:
        yield Client(http, auth, stack)


async def test_websocket_client_gets_every_event_and_the_pushed_png(
    client: Client,
) -> None:
    accepted, frames = await client.generate({**SMALL, "seed": 42})
    ident = accepted["id"]
    kinds = [frame["type"] for frame in frames]
    assert kinds == ["queued", "started", *["progress"] * 6, "image", "done"]
    progress = frames[2:8]
    assert [(p["step"], p["total"]) for p in progress] == [(s, 6) for s in range(1, 7)]
    previews = [p["preview"] for p in progress if p["preview"]]
    assert previews
    assert all(p.startswith("data:image/jpeg;base64,") for p in previews)
    image = frames[8]
    assert image["seed"] == 42
    assert (
        image["url"] == f"{client.stack.base_url}/api/v1/generations/{ident}/images/0"
    )
    assert frames[9] == {"type": "done", "id": ident, "status": "succeeded"}
    pushed = base64.b64decode(image["data"])
    assert await client.download(ident) == pushed
    with Image.open(io.BytesIO(pushed)) as png:
        assert png.size == (64, 64)
        assert "a lighthouse at dusk" in png.text["parameters"]  # type: ignore[attr-defined]


async def test_the_same_seed_gives_the_same_bytes(client: Client) -> None:
    request = {**SMALL, "seed": 7, "prompt": "a quiet harbour"}
    first, _ = await client.generate(request)
    second, _ = await client.generate(request)
    assert first["id"] != second["id"]
    one = png_chunks(await client.download(first["id"]))
    two = png_chunks(await client.download(second["id"]))
    # Byte-identical image data and parameters; only the `sdapi` manifest
    # differs, as it names each generation.
    assert one["IDAT"] == two["IDAT"]
    assert one["IHDR"] == two["IHDR"]
    assert text_chunk(one, "parameters") == text_chunk(two, "parameters")
    assert text_chunk(one, "sdapi") != text_chunk(two, "sdapi")
    other, _ = await client.generate({**request, "seed": 8})
    assert png_chunks(await client.download(other["id"]))["IDAT"] != one["IDAT"]


async def test_cancel_mid_run_ends_cancelled(client: Client) -> None:
    async with client.http.get("/api/v1/models", headers=client.auth) as response:
        [tiny] = [m for m in (await response.json())["items"] if m["id"] == "tiny"]
    # The largest size and most steps: seconds of work on these CPUs.
    request = {
        "prompt": "a long night",
        "width": tiny["max_width"],
        "height": tiny["max_height"],
        "steps": 150,
    }
    async with client.http.ws_connect(client.stack.ws_url, headers=client.auth) as ws:
        await ws.send_json({"type": "generate", "request": request})
        ident = (await ws.receive_json(timeout=30))["id"]
        kinds = []
        async with asyncio.timeout(60):
            while "progress" not in kinds:
                kinds.append((await ws.receive_json())["type"])
        started = time.monotonic()
        await ws.send_json({"type": "cancel", "id": ident})
        frames = await client.frames_until_done(ws, ident)
    assert frames[-1] == {"type": "done", "id": ident, "status": "cancelled"}
    assert "image" not in [frame["type"] for frame in frames]
    assert time.monotonic() - started < 10

    async def settled() -> dict[str, Any] | None:
        path = f"/api/v1/generations/{ident}"
        async with client.http.get(path, headers=client.auth) as response:
            body: dict[str, Any] = await response.json()
        return body if body["status"] == "cancelled" and body["finished_at"] else None

    shown = await until(settled, 30, "the cancelled row", client.stack.services)
    assert shown["images"] == []


async def test_email_delivery_arrives_with_the_png_and_a_download_link(
    client: Client,
) -> None:
    before = len(client.stack.mailbox.messages)
    accepted, frames = await client.generate({**SMALL, "seed": 5, "delivery": "email"})
    ident = accepted["id"]
    assert frames[-1]["status"] == "succeeded"

    async def arrived() -> EmailMessage | None:
        for message in client.stack.mailbox.messages[before:]:
            body = message.get_body(("plain",))
            if body is not None and ident in body.get_content():
                return message
        return None

    message = await until(arrived, 30, "the email", client.stack.services)
    [png] = [
        part.get_content()
        for part in message.iter_attachments()
        if part.get_content_type() == "image/png"
    ]
    downloaded = await client.download(ident)
    assert png == downloaded
    text = message.get_body(("plain",))
    assert text is not None
    link = re.search(r"(http://\S+/images/0\?\S+)", text.get_content())
    assert link, text.get_content()
    assert link.group(1).startswith(client.stack.base_url)
    async with (
        aiohttp.ClientSession() as anonymous,
        anonymous.get(link.group(1)) as response,
    ):
        assert response.status == 200
        assert await response.read() == downloaded


async def test_openai_route_answers_in_openai_shapes(client: Client) -> None:
    images = "/v1/images/generations"
    body = {"prompt": "a lighthouse", "model": "tiny", "size": "64x64", "n": 2}
    async with client.http.post(
        images, json={**body, "response_format": "b64_json"}, headers=client.auth
    ) as response:
        assert response.status == 200
        result = await response.json()
    assert set(result) == {"created", "data"}
    assert abs(result["created"] - time.time()) < 120
    pngs = [base64.b64decode(item["b64_json"]) for item in result["data"]]
    assert len(pngs) == 2
    assert all(png.startswith(b"\x89PNG") for png in pngs)

    async with client.http.post(
        images, json={"prompt": "a lighthouse"}, headers=client.auth
    ) as response:
        [item] = (await response.json())["data"]
    assert set(item) == {"url"}
    assert item["url"].startswith(client.stack.base_url)
    async with aiohttp.ClientSession() as anonymous, anonymous.get(item["url"]) as got:
        assert got.status == 200
        assert (await got.read()).startswith(b"\x89PNG")

    async with client.http.post(
        images, json={**body, "size": "100x100"}, headers=client.auth
    ) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    # OpenAI's keys (clients ignore the contract's extra `details`).
    assert {"message", "type", "param", "code"} <= set(error)
    assert (error["type"], error["param"]) == ("invalid_request_error", "size")


async def test_the_official_openai_client_works_unchanged(client: Client) -> None:
    import openai

    secret = client.auth["Authorization"].removeprefix("Bearer ")
    api = openai.AsyncOpenAI(
        api_key=secret, base_url=f"{client.stack.base_url}/v1", max_retries=0
    )
    try:
        result = await api.images.generate(
            prompt="a lighthouse", model="tiny", response_format="b64_json"
        )
        [item] = result.data
        assert base64.b64decode(item.b64_json or "").startswith(b"\x89PNG")
        with pytest.raises(openai.BadRequestError) as caught:
            await api.images.generate(prompt="a lighthouse", size="100x100")
        assert caught.value.code == "validation_error"
        assert caught.value.param == "size"
    finally:
        await api.close()


def _noise_png(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _mask_png(size: int = 64) -> bytes:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _rgb(data: bytes) -> np.ndarray[Any, Any]:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


async def test_img2img_over_the_websocket_reports_strength_times_steps(
    client: Client,
) -> None:
    source = _noise_png(1)
    request = {
        "prompt": "a lighthouse, oil painting",
        "init_image": base64.b64encode(source).decode(),
        "strength": 0.5,
        "steps": 8,
        "seed": 5,
    }
    accepted, frames = await client.generate(request)
    kinds = [frame["type"] for frame in frames]
    # 8 steps at strength 0.5 run 4: the progress total says so.
    assert kinds == ["queued", "started", *["progress"] * 4, "image", "done"]
    assert [(f["step"], f["total"]) for f in frames[2:6]] == [
        (s, 4) for s in range(1, 5)
    ]
    assert frames[-1]["status"] == "succeeded"
    made = await client.download(accepted["id"])
    digest = accepted["generation"]["request"]["init_image_sha256"]
    manifest = json.loads(text_chunk(png_chunks(made), "sdapi").split(b"\0", 1)[1])
    assert manifest["init_image_sha256"] == digest
    assert manifest["strength"] == 0.5
    # Same seed and inputs, same pixels; the earlier result as the input works.
    again, _ = await client.generate(request)
    assert (
        png_chunks(await client.download(again["id"]))["IDAT"]
        == (png_chunks(made)["IDAT"])
    )
    reference = {"generation_id": accepted["id"], "index": 0}
    chained, frames = await client.generate({**request, "init_image": reference})
    assert frames[-1]["status"] == "succeeded"
    assert chained["generation"]["request"]["init_image_sha256"] != digest


async def test_strength_zero_returns_the_input(client: Client) -> None:
    source = _noise_png(2)
    accepted, frames = await client.generate(
        {
            "prompt": "unchanged",
            "init_image": base64.b64encode(source).decode(),
            "strength": 0,
        }
    )
    # No denoising step at all: no progress, the input comes back.
    assert [f["type"] for f in frames] == ["queued", "started", "image", "done"]
    assert np.array_equal(_rgb(await client.download(accepted["id"])), _rgb(source))


async def test_inpainting_keeps_the_pixels_outside_the_mask(client: Client) -> None:
    source = _noise_png(3)
    accepted, frames = await client.generate(
        {
            "prompt": "a red door",
            "init_image": base64.b64encode(source).decode(),
            "mask": base64.b64encode(_mask_png()).decode(),
            "steps": 6,
            "num_images": 2,
        }
    )
    assert frames[-1]["status"] == "succeeded"
    assert [f["total"] for f in frames if f["type"] == "progress"] == [6] * 6
    outside = np.ones((64, 64), dtype=bool)
    outside[16:48, 16:48] = False
    original = _rgb(source)
    for index in (0, 1):
        made = _rgb(await client.download(accepted["id"], index))
        # Measured: 0 (the input's own pixels are put back outside the mask).
        assert np.abs(made[outside] - original[outside]).max() == 0
        assert np.abs(made[~outside] - original[~outside]).max() > 0


async def test_images_edit_with_the_official_client(client: Client) -> None:
    import openai

    secret = client.auth["Authorization"].removeprefix("Bearer ")
    api = openai.AsyncOpenAI(
        api_key=secret, base_url=f"{client.stack.base_url}/v1", max_retries=0
    )
    rgba = np.full((64, 64, 4), 255, dtype=np.uint8)
    rgba[16:48, 16:48, 3] = 0
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    source = _noise_png(4)
    try:
        result = await api.images.edit(
            image=("photo.png", source, "image/png"),
            mask=("mask.png", buffer.getvalue(), "image/png"),
            prompt="a window",
            model="tiny",
            response_format="b64_json",
        )
    finally:
        await api.close()
    [item] = result.data
    made = _rgb(base64.b64decode(item.b64_json or ""))
    original = _rgb(source)
    assert np.array_equal(made[:16], original[:16])
    assert not np.array_equal(made[16:48, 16:48], original[16:48, 16:48])

"""The AUTOMATIC1111-compatible API end to end: `sdapi web`, `sdapi jobs` and a
`tiny` `sdapi gpu-node` as real processes, driven by the published client
`webuiapi` unchanged (synchronous: it runs in this test's threads)."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from sdapi.db.connection import open_database, truncate_all
from sdapi.devtools.accounts import make_user
from sdapi.devtools.net import free_port
from tests.e2e.conftest import (
    Service,
    Services,
    node_env,
    own_redis_db,
    sdapi_env,
    start_services,
)
from tests.support import until_sync

pytestmark = pytest.mark.slow

# A Valkey database of the suite's server of this module's own.
REDIS_DB = 8
SMALL: dict[str, Any] = {"width": 64, "height": 64, "steps": 4}


@dataclass
class Stack:
    port: int
    services: Services
    secret: str

    def api(self) -> webuiapi.WebUIApi:
        """The client as the README shows it: host, port, and a token."""
        api = webuiapi.WebUIApi(host="127.0.0.1", port=self.port)
        api.set_auth("me@example.org", self.secret)
        return api


@pytest.fixture(scope="module")
def stack(
    database_url: str,
    redis_url: str,
    e2e_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("a1111-e2e")
    own_redis = own_redis_db(redis_url, REDIS_DB)
    asyncio.run(truncate_all(database_url))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    common: dict[str, object] = {
        "database_url": database_url,
        "redis_url": own_redis,
        "data_dir": root / "data",
        "secret_key": "e2e-secret-key",
        "public_url": base_url,
    }
    services = Services()
    services.add(Service("web", "web", sdapi_env(**common, port=port), root))
    # No mail is sent here: an address nothing listens on will do.
    smtp_url = f"smtp://127.0.0.1:{free_port()}"
    services.add(Service("jobs", "jobs", sdapi_env(**common, smtp_url=smtp_url), root))
    node = node_env(common, e2e_model_dir, "e2e-a1111-node", gpu_preview_every=2)
    services.add(Service("gpu-node", "gpu-node", node, root))

    async def premium_token() -> str:
        async with open_database(database_url, pool_size=1):
            return (await make_user(premium=True)).secret

    try:
        start_services(services, base_url, own_redis)
        yield Stack(port, services, asyncio.run(premium_token()))
    finally:
        services.stop()


def pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("RGB"))


def test_the_seeds_in_info_repeat_the_same_pixels(stack: Stack) -> None:
    api = stack.api()
    first = api.txt2img(
        prompt="a quiet harbour", seed=-1, batch_size=2, n_iter=2, **SMALL
    )
    seeds = first.info["all_seeds"]
    assert len(first.images) == len(seeds) == 4
    assert seeds == [first.info["seed"] + i for i in range(4)]
    again = api.txt2img(
        prompt="a quiet harbour",
        seed=first.info["seed"],
        batch_size=2,
        n_iter=2,
        **SMALL,
    )
    for one, two in zip(first.images, again.images, strict=True):
        assert np.array_equal(pixels(one), pixels(two))
    # Any one image alone, from its own seed: the same picture, though not
    # bit for bit (CPU kernels round a batch of 4 unlike a batch of 1; see
    # tests/gpu_node/test_generation.py test_batch_images_match_single_requests).
    alone = api.txt2img(prompt="a quiet harbour", seed=seeds[3], **SMALL)
    difference = pixels(alone.image).astype(int) - pixels(first.images[3])
    assert np.abs(difference).max() <= 2
    assert not np.array_equal(pixels(first.images[0]), pixels(first.images[1]))


def test_inpainting_keeps_the_pixels_outside_the_mask(stack: Stack) -> None:
    rng = np.random.default_rng(3)
    source = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = stack.api().img2img(
        images=[source],
        mask_image=mask,
        prompt="a red door",
        denoising_strength=0.9,
        mask_blur=0,
        inpainting_fill=1,
        inpaint_full_res=False,
        seed=5,
        **SMALL,
    )
    made = pixels(result.image)
    outside = np.asarray(mask) == 0
    assert np.array_equal(made[outside], pixels(source)[outside])
    assert not np.array_equal(made[~outside], pixels(source)[~outside])


def test_progress_while_a_slow_txt2img_runs_then_interrupt(stack: Stack) -> None:
    api, watcher = stack.api(), stack.api()
    models = requests.get(
        f"http://127.0.0.1:{stack.port}/api/v1/models",
        headers={"Authorization": f"Bearer {stack.secret}"},
        timeout=10,
    ).json()
    [tiny] = [model for model in models["items"] if model["id"] == "tiny"]
    with ThreadPoolExecutor(1) as pool:
        # The largest size and most steps: seconds of work on these CPUs.
        slow: Future[Any] = pool.submit(
            api.txt2img,
            prompt="a long night",
            width=tiny["max_width"],
            height=tiny["max_height"],
            steps=150,
        )

        def midway() -> dict[str, Any] | None:
            progress: dict[str, Any] = watcher.get_progress()
            state = progress["state"]
            running = 0 < progress["progress"] < 1 and state["sampling_step"] > 2
            return progress if running and progress["current_image"] else None

        shown = until_sync(
            midway, 60, "progress of the running txt2img", stack.services
        )
        assert shown["state"]["sampling_steps"] == 150
        assert shown["state"]["job_count"] == 1
        assert shown["eta_relative"] > 0
        preview = base64.b64decode(shown["current_image"])
        with Image.open(io.BytesIO(preview)) as image:
            assert image.width > 0
        assert watcher.interrupt() == {}
        with pytest.raises(RuntimeError) as caught:
            slow.result(timeout=30)
        assert caught.value.args[0] == 410
    assert watcher.get_progress()["state"]["job_count"] == 0

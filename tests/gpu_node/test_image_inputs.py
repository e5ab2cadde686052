"""img2img and inpainting in the engine: strengths, masks, seeds, step counts."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpu_node import pipeline, weights
from gpu_node.calls import CallItem, PipelineCall
from gpu_node.images import InputError, load_input
from sdapi.contract.payloads import GenerationParams, Mode

SIZE = 64


class _Steps:
    """Records the (step, total) pairs the engine reports."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def before_start(self) -> None:
        pass

    def on_step(
        self, step: int, total: int, preview: Callable[[str], bytes | None]
    ) -> None:
        self.seen.append((step, total))

    def between_images(self) -> None:
        pass


def _pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _gradient() -> Image.Image:
    x = np.linspace(0, 255, SIZE, dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(x[None, :], x[:, None], 128), axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def _square_mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask, mode="L")


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> pipeline.DiffusersEngine:
    return pipeline.load_engine(weights.locate_model("tiny", models_dir), device="cpu")


def _call(
    *items: CallItem, mode: Mode, strength: float = 1.0, steps: int = 10
) -> PipelineCall:
    return PipelineCall(SIZE, SIZE, steps, 7.5, "euler", items, mode, strength)


def _img2img(key: str, seeds: tuple[int, ...], image: Image.Image) -> CallItem:
    return CallItem(key, "a boat", "", seeds, init_image=image)


def test_img2img_at_a_strength_runs_that_share_of_the_steps(
    engine: pipeline.DiffusersEngine,
) -> None:
    steps = _Steps()
    images = engine.run(
        _call(_img2img("g", (3,), _gradient()), mode=Mode.IMG2IMG, strength=0.5),
        steps,
    )
    assert images["g"][0].size == (SIZE, SIZE)
    # diffusers runs int(10 * 0.5) steps, and the params promise as much.
    assert steps.seen == [(step, 5) for step in range(1, 6)]
    params = GenerationParams(
        prompt="a boat",
        width=SIZE,
        height=SIZE,
        steps=10,
        guidance_scale=7.5,
        seed=3,
        num_images=1,
        scheduler="euler",
        init_image_sha256="0" * 64,
        strength=0.5,
    )
    assert params.denoising_steps == 5


def test_img2img_is_deterministic_and_batching_changes_nothing(
    engine: pipeline.DiffusersEngine,
) -> None:
    other = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    first = engine.run(
        _call(_img2img("g", (3,), _gradient()), mode=Mode.IMG2IMG, strength=0.6),
        _Steps(),
    )
    again = engine.run(
        _call(
            _img2img("h", (9,), other),
            _img2img("g", (3,), _gradient()),
            mode=Mode.IMG2IMG,
            strength=0.6,
        ),
        _Steps(),
    )
    # Batched kernels may round a pixel one step away (see test_generation).
    assert np.abs(_pixels(first["g"][0]) - _pixels(again["g"][0])).max() <= 2
    repeat = engine.run(
        _call(_img2img("g", (3,), _gradient()), mode=Mode.IMG2IMG, strength=0.6),
        _Steps(),
    )
    assert np.array_equal(_pixels(first["g"][0]), _pixels(repeat["g"][0]))
    # The input matters below strength 1.
    moved = engine.run(
        _call(_img2img("g", (3,), other), mode=Mode.IMG2IMG, strength=0.6), _Steps()
    )
    assert not np.array_equal(_pixels(first["g"][0]), _pixels(moved["g"][0]))


def test_strength_zero_returns_the_input_unchanged(
    engine: pipeline.DiffusersEngine,
) -> None:
    # diffusers refuses a call with no step left; ours returns the input.
    steps = _Steps()
    for mode, mask in ((Mode.IMG2IMG, None), (Mode.INPAINT, _square_mask())):
        item = CallItem("g", "a boat", "", (1, 2), init_image=_gradient(), mask=mask)
        images = engine.run(_call(item, mode=mode, strength=0.0), steps)
        assert [_pixels(i).tolist() for i in images["g"]] == [
            _pixels(_gradient()).tolist()
        ] * 2
    assert steps.seen == []


def test_strength_one_ignores_the_input(engine: pipeline.DiffusersEngine) -> None:
    text = engine.run(
        _call(CallItem("g", "a boat", "", (4,)), mode=Mode.TXT2IMG), _Steps()
    )
    for image in (_gradient(), Image.new("RGB", (SIZE, SIZE), (0, 0, 255))):
        made = engine.run(
            _call(_img2img("g", (4,), image), mode=Mode.IMG2IMG, strength=1.0),
            _Steps(),
        )
        assert np.array_equal(_pixels(made["g"][0]), _pixels(text["g"][0]))


def test_inpainting_keeps_every_pixel_outside_the_mask(
    engine: pipeline.DiffusersEngine,
) -> None:
    mask = _square_mask()
    item = CallItem("g", "a boat", "", (5, 6), init_image=_gradient(), mask=mask)
    steps = _Steps()
    images = engine.run(_call(item, mode=Mode.INPAINT, strength=1.0), steps)
    outside = np.asarray(mask) == 0
    source = _pixels(_gradient())
    for image in images["g"]:
        made = _pixels(image)
        # Measured tolerance outside the mask: 0 (the input's pixels are put
        # back; the tiny model's random VAE round trip alone is off by up to
        # 231 of 255, 62 on average, on this gradient).
        assert np.abs(made[outside] - source[outside]).max() == 0
        assert np.abs(made[~outside] - source[~outside]).max() > 0
    assert steps.seen[-1] == (10, 10)
    again = engine.run(_call(item, mode=Mode.INPAINT, strength=1.0), _Steps())
    assert np.array_equal(_pixels(again["g"][1]), _pixels(images["g"][1]))


def test_inpainting_at_a_lower_strength_runs_fewer_steps(
    engine: pipeline.DiffusersEngine,
) -> None:
    item = CallItem(
        "g", "a boat", "", (5,), init_image=_gradient(), mask=_square_mask()
    )
    steps = _Steps()
    engine.run(_call(item, mode=Mode.INPAINT, strength=0.3), steps)
    assert steps.seen[-1] == (3, 3)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_input_is_checked_against_its_hash_and_sized_for_the_call() -> None:
    data = _png(_gradient())
    digest = hashlib.sha256(data).hexdigest()
    loaded = load_input(data, digest, "RGB", (32, 32))
    assert loaded.size == (32, 32) and loaded.mode == "RGB"
    with pytest.raises(InputError, match="SHA-256"):
        load_input(data, "0" * 64, "RGB", (32, 32))
    soft = Image.fromarray(np.full((8, 8), 100, dtype=np.uint8), mode="L")
    soft_png = _png(soft)
    mask = load_input(soft_png, hashlib.sha256(soft_png).hexdigest(), "L", (8, 8))
    # Binarized as diffusers does: under half is kept.
    assert set(np.asarray(mask).ravel().tolist()) == {0}


@pytest.fixture(scope="module")
def inpainting_engine(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> pipeline.DiffusersEngine:
    """A dedicated inpainting checkpoint: the tiny model with a 9-channel UNet."""
    import torch
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    tiny: Any = StableDiffusionPipeline.from_pretrained(
        str(models_dir / "tiny"), use_safetensors=True, local_files_only=True
    )
    config = dict(tiny.unet.config)
    config["in_channels"] = 9
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(config)
    components = {**tiny.components, "unet": unet}
    folder = tmp_path_factory.mktemp("inpainting") / "tiny-inpainting"
    inpainting: Any = StableDiffusionInpaintPipeline(**components)
    inpainting.save_pretrained(str(folder), safe_serialization=True)
    location = weights.locate_model(str(folder), folder.parent / "unused")
    return pipeline.load_engine(location, device="cpu")


def test_a_dedicated_inpainting_checkpoint_serves_every_mode(
    inpainting_engine: pipeline.DiffusersEngine,
) -> None:
    assert inpainting_engine._base.unet.config.in_channels == 9
    text = CallItem("t", "a boat", "", (1,))
    made = inpainting_engine.run(_call(text, mode=Mode.TXT2IMG, steps=4), _Steps())
    assert made["t"][0].size == (SIZE, SIZE)
    steps = _Steps()
    inpainting_engine.run(
        _call(_img2img("i", (2,), _gradient()), mode=Mode.IMG2IMG, strength=0.5),
        steps,
    )
    assert steps.seen[-1] == (5, 5)
    mask = _square_mask()
    item = CallItem("m", "a boat", "", (3,), init_image=_gradient(), mask=mask)
    [painted] = inpainting_engine.run(_call(item, mode=Mode.INPAINT), _Steps())["m"]
    outside = np.asarray(mask) == 0
    assert np.array_equal(_pixels(painted)[outside], _pixels(_gradient())[outside])

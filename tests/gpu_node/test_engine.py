"""The diffusers engine: out of memory, the shared VAE, SDXL's empty negatives."""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from gpu_node import pipeline, tiny, weights
from gpu_node.calls import CallItem, OutOfMemory, PipelineCall, QuietObserver


def _pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> pipeline.DiffusersEngine:
    """A tiny engine of this module's own (its modules get patched)."""
    return pipeline.load_engine(weights.locate_model("tiny", models_dir), device="cpu")


def _call(*items: CallItem, steps: int = 2, guidance: float = 7.5) -> PipelineCall:
    return PipelineCall(64, 64, steps, guidance, "euler", items)


def test_out_of_memory_frees_the_failed_call_before_emptying_the_cache(
    engine: pipeline.DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    held: list[weakref.ref[torch.Tensor]] = []
    freed_when_emptied: list[bool] = []

    def forward(*args: Any, **kwargs: Any) -> Any:
        activations = torch.zeros(1024)
        held.append(weakref.ref(activations))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine._base.unet, "forward", forward)
    monkeypatch.setattr(
        torch.cuda, "empty_cache", lambda: freed_when_emptied.append(held[0]() is None)
    )
    with pytest.raises(OutOfMemory) as caught:
        engine.run(_call(CallItem("g", "a boat", "", (1, 2))), QuietObserver())
    # The retry must not run beside the failed call's tensors.
    assert freed_when_emptied == [True]
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_the_vae_decodes_one_image_at_a_time_and_keeps_its_dtype(
    engine: pipeline.DiffusersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    vae = engine._base.vae
    assert vae.use_slicing
    dtype = vae.dtype

    def decode(*args: Any, **kwargs: Any) -> Any:
        # What SDXL's pipeline does to a float16 VAE before an out-of-memory.
        vae.to(dtype=torch.float64)
        raise RuntimeError("decoding failed")

    monkeypatch.setattr(vae, "decode", decode)
    with pytest.raises(RuntimeError, match="decoding failed"):
        engine.run(_call(CallItem("g", "a boat", "", (1,))), QuietObserver())
    assert vae.dtype == dtype
    monkeypatch.undo()
    images = engine.run(_call(CallItem("g", "a boat", "", (1,))), QuietObserver())
    assert images["g"][0].size == (64, 64)


def test_the_safety_checker_is_never_fetched_or_required(
    tmp_path: Path, models_dir: Path
) -> None:
    assert not weights.hub_file_wanted("safety_checker/model.safetensors")
    assert not weights.hub_file_wanted("safety_checker/config.json")
    assert weights.hub_file_wanted("unet/diffusion_pytorch_model.safetensors")
    assert weights.hub_file_wanted("feature_extractor/preprocessor_config.json")
    # A local SD 1.5 folder whose safety checker is a pickle still loads.
    folder = tmp_path / "with-checker"
    shutil.copytree(models_dir / "tiny", folder)
    (folder / "safety_checker").mkdir()
    (folder / "safety_checker" / "pytorch_model.bin").write_bytes(b"not loaded")
    index = (folder / "model_index.json").read_text()
    (folder / "model_index.json").write_text(
        index.replace(
            '"safety_checker": [\n    null,\n    null\n  ]',
            '"safety_checker": [\n    "stable_diffusion",\n'
            '    "StableDiffusionSafetyChecker"\n  ]',
        )
    )
    assert "StableDiffusionSafetyChecker" in (folder / "model_index.json").read_text()
    location = weights.locate_model(str(folder), tmp_path / "unused")
    tiny.prepare_model(location)
    engine = pipeline.load_engine(location, device="cpu")
    assert engine._base.safety_checker is None


# --- SDXL ----------------------------------------------------------------------


def _build_tiny_sdxl(folder: Path) -> None:
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    vocabulary = folder.parent / "sdxl-vocabulary"
    size = tiny.write_clip_vocabulary(vocabulary)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(vocabulary),
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
    text = {
        "vocab_size": size,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
        "bos_token_id": size - 2,
        "eos_token_id": size - 1,
        "pad_token_id": size - 1,
        "projection_dim": 32,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            sample_size=32,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            # 6 time ids of 8 + the second encoder's 32-wide pooled output.
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
        )
        vae = AutoencoderKL(  # type: ignore[no-untyped-call]
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            sample_size=256,
        )
        first = CLIPTextModel(CLIPTextConfig(**text))
        second = CLIPTextModelWithProjection(CLIPTextConfig(**text))
    scheduler = EulerDiscreteScheduler(  # type: ignore[no-untyped-call]
        **tiny.NOISE_SCHEDULE, timestep_spacing="leading"
    )
    pipe: Any = StableDiffusionXLPipeline(  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=first,
        text_encoder_2=second,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        for sub in ("tokenizer", "tokenizer_2"):
            shutil.copy(vocabulary / name, folder / sub / name)


@pytest.fixture(scope="module")
def sdxl_engine(tmp_path_factory: pytest.TempPathFactory) -> pipeline.DiffusersEngine:
    """An SDXL-shaped pipeline with tiny random weights."""
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    _build_tiny_sdxl(folder)
    location = weights.locate_model(str(folder), folder.parent / "unused")
    return pipeline.load_engine(location, device="cpu")


def test_sdxl_without_a_negative_prompt_gets_the_zero_embedding_in_any_batch(
    sdxl_engine: pipeline.DiffusersEngine,
) -> None:
    assert sdxl_engine.profile.pipeline == "sdxl"
    castle = CallItem("castle", "a castle", "", (5,))
    boat = CallItem("boat", "a boat", "fog", (6,))
    mixed = sdxl_engine.run(_call(castle, boat, guidance=5.0), QuietObserver())
    alone = sdxl_engine.run(_call(castle, guidance=5.0), QuietObserver())

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    base = sdxl_engine._base
    reference: Any = StableDiffusionXLPipeline(  # type: ignore[no-untyped-call]
        **{
            **base.components,
            "scheduler": EulerDiscreteScheduler.from_config(base.scheduler.config),
        }
    )
    reference.set_progress_bar_config(disable=True)

    def direct(negative_prompt: list[str] | None) -> Image.Image:
        with torch.inference_mode():
            output = reference(
                prompt=["a castle"],
                negative_prompt=negative_prompt,
                width=64,
                height=64,
                num_inference_steps=2,
                guidance_scale=5.0,
                generator=[torch.Generator(device="cpu").manual_seed(5)],
                output_type="pil",
            )
        image: Image.Image = output.images[0]
        return image

    zeroed = _pixels(direct(None))
    # What diffusers gives a negative prompt of "": not the same image.
    assert np.abs(_pixels(direct([""])) - zeroed).max() > 0
    assert np.array_equal(_pixels(alone["castle"][0]), zeroed)
    # In a batch, kernels may round a pixel one step away (see test_generation).
    assert np.abs(_pixels(mixed["castle"][0]) - zeroed).max() <= 2


def test_sdxl_runs_img2img_and_inpainting_from_its_loaded_modules(
    sdxl_engine: pipeline.DiffusersEngine,
) -> None:
    from sdapi.contract.payloads import Mode

    base = sdxl_engine._base
    modules = {id(module) for module in base.components.values()}
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    source = Image.fromarray(
        np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 90), axis=-1).astype(
            np.uint8
        )
    )
    mask_pixels = np.zeros((64, 64), dtype=np.uint8)
    mask_pixels[16:48, 16:48] = 255
    mask = Image.fromarray(mask_pixels)
    item = CallItem("g", "a castle", "", (5,), init_image=source, mask=mask)
    for mode, strength in ((Mode.IMG2IMG, 0.5), (Mode.INPAINT, 1.0)):
        call = PipelineCall(64, 64, 4, 5.0, "euler", (item,), mode, strength)
        [made] = sdxl_engine.run(call, QuietObserver())["g"]
        assert made.size == (64, 64)
        if mode is Mode.INPAINT:
            outside = mask_pixels == 0
            assert np.array_equal(_pixels(made)[outside], _pixels(source)[outside])
    # No module was copied: the same objects serve every mode.
    assert {id(module) for module in base.components.values()} == modules

"""The tiny model: a Stable Diffusion pipeline with random weights, built here.

Every machine builds the same one from a fixed seed (no download), with the
real CLIP tokenizer this package ships, so CPU nodes, tests and benchmarks
serve a real pipeline in a few megabytes. It imports torch like
`gpu_node.pipeline` (the engine), and only when a tiny model is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gpu_node import weights
from gpu_node.pipeline import quiet_libraries
from gpu_node.vocabulary import (  # noqa: F401 (the tiny model's vocabulary API)
    CLIP_MERGES,
    clip_vocabulary_file,
    write_clip_vocabulary,
)

# The tiny model's weights come from this seed, so every machine makes the
# same model (and the same images for the same request).
TINY_SEED = 20240601
TINY_NATIVE_SIZE = 256
# Stable Diffusion 1.x's noise schedule, as its released scheduler config has
# it; the tiny model (and the random-weight models of tests and benchmarks)
# use it so their timesteps match a real checkpoint's.
NOISE_SCHEDULE: Mapping[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
# The PNDM scheduler SD 1.x ships with, on that schedule.
SCHEDULER_CONFIG: Mapping[str, Any] = {
    **NOISE_SCHEDULE,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
}


def build_tiny_model(folder: Path) -> None:
    """Make the tiny SD pipeline (random weights from TINY_SEED) in `folder`."""
    quiet_libraries()
    scratch = folder / "_vocabulary"
    vocab_size = write_clip_vocabulary(scratch)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(scratch),
        model_max_length=77,
        pad_token="<|endoftext|>",  # noqa: S106 (a token, not a password)
    )
    # fork_rng: the global RNG of a process that builds the model stays as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            sample_size=TINY_NATIVE_SIZE // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=32,
        )
        # Four blocks, so the VAE still scales by 8 as SD's does.
        vae = AutoencoderKL(  # type: ignore[no-untyped-call]
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=TINY_NATIVE_SIZE,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=77,
                bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1,
            )
        )
    scheduler = PNDMScheduler(**SCHEDULER_CONFIG)  # type: ignore[no-untyped-call]
    pipe: Any = StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        os.replace(scratch / name, folder / "tokenizer" / name)
    scratch.rmdir()


def prepare_model(location: weights.ModelLocation) -> None:
    """`weights.prepare_model` with this module's tiny-model builder."""
    weights.prepare_model(location, build_tiny_model)

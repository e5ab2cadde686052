"""The tiny model: a Stable Diffusion pipeline with random weights, built here.

Every machine builds the same one from a fixed seed (no download), with the
real CLIP tokenizer this package ships, so CPU nodes, tests and benchmarks
serve a real pipeline in a few megabytes. It imports torch like
`gpu_node.pipeline` (the engine), and only when a tiny model is built.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable
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

# The tiny model's weights come from this seed, so every machine makes the
# same model (and the same images for the same request).
TINY_SEED = 20240601
TINY_NATIVE_SIZE = 256
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The real CLIP vocabulary: 256 bytes, 256 end-of-word bytes, 48,894 merges and
# the two special tokens.
CLIP_MERGES = 49152 - 256 - 2

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


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE: every byte gets a printable stand-in character.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def clip_vocabulary_file() -> Traversable:
    """The CLIP BPE merges file this package ships (OpenAI CLIP, MIT licence)."""
    return resources.files("gpu_node") / "data" / CLIP_VOCAB_FILE


def write_clip_vocabulary(folder: Path) -> int:
    """Write vocab.json and merges.txt of CLIP's tokenizer; return the vocab size."""
    base = list(_bytes_to_unicode().values())
    # The first line of the file is a version header, not a merge.
    lines = gzip.decompress(clip_vocabulary_file().read_bytes()).decode("utf-8")
    merges = lines.split("\n")[1 : CLIP_MERGES + 1]
    vocab = [*base, *(token + "</w>" for token in base)]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps(
            {token: index for index, token in enumerate(vocab)}, ensure_ascii=False
        )
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


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

"""Benchmark: raw pipeline images/s against the same requests through the node.

Each mode at the same size and steps: text-to-image, img2img at strength 0.5
(so about half the steps run) and inpainting (strength 1, a centred mask).

CPU (default): the built-in tiny model, 128x128, 20 steps; batches 1, 4, 8.
GPU (--gpu): an SD-1.5-architecture pipeline with random weights built from
its configs (no download), fp16, 512x512, 25 steps, guidance 7.5; batches
1, 4, 8, 16; reports batching gain, peak memory and model-load time.

"Raw" calls the engine directly; "service" enqueues the same requests on the
node's queues (premium `generate` for batch 1, `generate_batch` otherwise)
on an embedded Valkey, with the node in this process, and waits for each
result: PNG encoding, Redis hand-off, events and polling included.

    .venv/bin/python bench/pipeline.py [--gpu] [--rounds N] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_node import pipeline, tiny, weights  # noqa: E402
from gpu_node.calls import (  # noqa: E402
    CallItem,
    Engine,
    PipelineCall,
    QuietObserver,
)
from sdapi.contract.names import input_key, result_job_id  # noqa: E402
from sdapi.contract.payloads import (  # noqa: E402
    BatchJob,
    GenerationJob,
    GenerationParams,
    Mode,
)
from sdapi.contract.status import Tier  # noqa: E402

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
CLIP_VIT_L14_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}


@dataclass
class Setup:
    name: str
    size: int
    steps: int
    guidance: float
    batches: tuple[int, ...]


def build_sd15_random(folder: Path) -> None:
    """An SD-1.5-shaped pipeline with random fp16 weights, saved as safetensors."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = folder / "_vocabulary"
    tiny.write_clip_vocabulary(vocab)
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab), model_max_length=77)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Built on the device: random init of 1 B parameters on a CPU takes minutes.
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET).half()
        vae = AutoencoderKL(**SD15_VAE).half()
        text = CLIPTextModel(CLIPTextConfig(**CLIP_VIT_L14_TEXT)).half()
    scheduler = PNDMScheduler(**tiny.SCHEDULER_CONFIG)
    StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(str(folder), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        (vocab / name).replace(folder / "tokenizer" / name)
    vocab.rmdir()


@dataclass(frozen=True)
class Variant:
    """One mode of generation the benchmark runs."""

    label: str
    mode: Mode
    strength: float


VARIANTS = (
    Variant("txt2img", Mode.TXT2IMG, 1.0),
    Variant("img2img 0.5", Mode.IMG2IMG, 0.5),
    Variant("inpaint", Mode.INPAINT, 1.0),
)


@dataclass(frozen=True)
class Inputs:
    """The init image and mask every img2img / inpainting request uses."""

    image: Any
    mask: Any
    image_png: bytes
    mask_png: bytes

    @property
    def image_sha256(self) -> str:
        return hashlib.sha256(self.image_png).hexdigest()

    @property
    def mask_sha256(self) -> str:
        return hashlib.sha256(self.mask_png).hexdigest()


def make_inputs(size: int) -> Inputs:
    """A gradient to start from and a mask over its centre half."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128), axis=-1)
    image = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    mask_pixels = np.zeros((size, size), dtype=np.uint8)
    mask_pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    mask = Image.fromarray(mask_pixels, mode="L")
    pngs = []
    for picture in (image, mask):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return Inputs(image, mask, pngs[0], pngs[1])


def make_call(
    setup: Setup, batch: int, round_: int, variant: Variant, inputs: Inputs
) -> PipelineCall:
    with_image = variant.mode is not Mode.TXT2IMG
    with_mask = variant.mode is Mode.INPAINT
    items = tuple(
        CallItem(
            f"r{round_}i{i}",
            f"a photo of thing {i}",
            "blurry",
            (1000 * round_ + i,),
            init_image=inputs.image if with_image else None,
            mask=inputs.mask if with_mask else None,
        )
        for i in range(batch)
    )
    return PipelineCall(
        setup.size,
        setup.size,
        setup.steps,
        setup.guidance,
        "euler_a",
        items,
        variant.mode,
        variant.strength,
    )


def _params(
    setup: Setup, seed: int, variant: Variant, inputs: Inputs
) -> GenerationParams:
    with_image = variant.mode is not Mode.TXT2IMG
    return GenerationParams(
        prompt=f"a photo of thing {seed}",
        negative_prompt="blurry",
        width=setup.size,
        height=setup.size,
        steps=setup.steps,
        guidance_scale=setup.guidance,
        seed=seed,
        num_images=1,
        scheduler="euler_a",
        init_image_sha256=inputs.image_sha256 if with_image else None,
        mask_sha256=inputs.mask_sha256 if variant.mode is Mode.INPAINT else None,
        strength=variant.strength if with_image else None,
    )


@dataclass
class Timings:
    """Seconds per call of each path at one batch size."""

    raw: list[float]
    service: list[float]


async def measure(
    engine: Engine, setup: Setup, models_dir: Path, rounds: int, service: bool
) -> dict[tuple[Variant, int], Timings]:
    """Alternate raw calls and service rounds so that both see the same noise."""
    from arq.constants import job_key_prefix

    from gpu_node.node import GpuNode
    from gpu_node.settings import GpuNodeSettings
    from sdapi.devtools.embedded import EmbeddedValkey
    from sdapi.infra.queue import create_queue_pool, enqueue_batch, enqueue_generation

    model = engine.profile.model
    inputs = make_inputs(setup.size)
    results: dict[tuple[Variant, int], Timings] = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedValkey(Path(tmp)) as server:
        settings = GpuNodeSettings.from_env(
            model=model,
            model_dir=models_dir,
            redis_url=server.url,
            node_id="bench",
            gpu_max_batch=max(setup.batches),
            gpu_health_port=0,
            consul_url=None,
        )
        node = GpuNode(settings, server.url, engine=engine)
        await node.start()
        serving = asyncio.create_task(node.serve())
        pool = await create_queue_pool(server.url)
        try:
            # Where web and jobs put them: inputs travel by hash.
            await pool.set(input_key(inputs.image_sha256), inputs.image_png)
            await pool.set(input_key(inputs.mask_sha256), inputs.mask_png)

            async def one_round(variant: Variant, batch: int, round_: int) -> None:
                jobs = [
                    GenerationJob(
                        generation_id=uuid.uuid4(),
                        model=model,
                        tier=Tier.PREMIUM if batch == 1 else Tier.NORMAL,
                        params=_params(setup, 1000 * round_ + i, variant, inputs),
                    )
                    for i in range(batch)
                ]
                if batch == 1:
                    await enqueue_generation(pool, jobs[0], owner="bench")
                else:
                    await enqueue_batch(
                        pool, BatchJob(batch_id=uuid.uuid4(), model=model, items=jobs)
                    )
                keys = [job_key_prefix + result_job_id(j.generation_id) for j in jobs]
                # Polling (10 ms) rather than a wake-up: a `jobs` worker would
                # poll its queue the same way.
                while await pool.exists(*keys) < len(keys):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)

            async def raw_call(variant: Variant, batch: int, round_: int) -> None:
                # The node is idle meanwhile: its GPU thread waits for work.
                call = make_call(setup, batch, round_, variant, inputs)
                await asyncio.to_thread(engine.run, call, QuietObserver())

            for variant in VARIANTS:
                for batch in setup.batches:
                    timings = results[variant, batch] = Timings([], [])
                    # Warm-up: kernels, allocator, caches.
                    await raw_call(variant, batch, 999)
                    if service:
                        await one_round(variant, batch, 999)
                    for round_ in range(rounds):
                        started = time.perf_counter()
                        await raw_call(variant, batch, round_)
                        timings.raw.append(time.perf_counter() - started)
                        if service:
                            started = time.perf_counter()
                            await one_round(variant, batch, round_)
                            timings.service.append(time.perf_counter() - started)
        finally:
            await pool.aclose()
            node.request_stop()
            await serving
            await node.close()
    return results


def machine() -> str:
    import torch

    cpu = platform.processor() or "?"
    try:
        lscpu = subprocess.run(
            ["lscpu"],  # noqa: S607 (a system tool, found on PATH)
            capture_output=True,
            text=True,
            check=True,
        )
        for line in lscpu.stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    text = f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="SD-1.5 shape, fp16, CUDA")
    parser.add_argument("--rounds", type=int, default=0, help="calls per batch size")
    parser.add_argument("--model-dir", type=Path, help="reuse built models from here")
    parser.add_argument("--no-service", action="store_true", help="raw pipeline only")
    args = parser.parse_args()

    import torch

    if args.gpu:
        if not torch.cuda.is_available():
            parser.error("--gpu needs CUDA")
        setup = Setup(
            "SD-1.5 architecture, random fp16 weights", 512, 25, 7.5, (1, 4, 8, 16)
        )
    else:
        setup = Setup("tiny", 128, 20, 7.5, (1, 4, 8))
    rounds = args.rounds or (3 if args.gpu else 5)
    with tempfile.TemporaryDirectory() as tmp:
        models = args.model_dir or Path(tmp)
        if args.gpu:
            location = weights.ModelLocation(
                "sd15-random", models / "sd15-random", "local"
            )
            started = time.perf_counter()
            weights.install_folder(location.path, build_sd15_random)
            print(
                f"built random SD-1.5 weights in {time.perf_counter() - started:.1f} s"
            )
            torch.cuda.empty_cache()
        else:
            location = weights.locate_model("tiny", models)
            tiny.prepare_model(location)
        started = time.perf_counter()
        engine = pipeline.load_engine(location, device="cuda" if args.gpu else "cpu")
        if args.gpu:
            torch.cuda.synchronize()
        load_s = time.perf_counter() - started
        if args.gpu:
            torch.cuda.reset_peak_memory_stats()
        timings = asyncio.run(
            measure(engine, setup, models, rounds, service=not args.no_service)
        )
        peak = torch.cuda.max_memory_allocated() if args.gpu else 0

    print(f"\n{machine()}")
    print(
        f"model: {setup.name}, {setup.size}x{setup.size}, {setup.steps} steps, "
        f"guidance {setup.guidance}, euler_a, {rounds} calls per batch size"
    )
    print(f"model load (hash + from_pretrained + to device): {load_s:.2f} s")
    print(
        "\nimages/s from the fastest call of each path (the machine is shared: the"
        " median is given too)\n"
    )
    print(
        "| mode | steps run | batch | raw images/s | service images/s "
        "| service/raw | medians raw/service |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    gains: dict[str, float] = {}
    for variant in VARIANTS:
        best: dict[int, float] = {}
        ran = (
            setup.steps
            if variant.mode is Mode.TXT2IMG
            else int(setup.steps * variant.strength)
        )
        for batch in setup.batches:
            t = timings[variant, batch]
            best[batch] = batch / min(t.raw)
            raw_median = batch / statistics.median(t.raw)
            row = f"| {variant.label} | {ran} | {batch} | {best[batch]:.2f} "
            if t.service:
                svc = batch / min(t.service)
                svc_median = batch / statistics.median(t.service)
                row += (
                    f"| {svc:.2f} | {svc / best[batch]:.2f} "
                    f"| {raw_median:.2f} / {svc_median:.2f} |"
                )
            else:
                row += f"| - | - | {raw_median:.2f} / - |"
            print(row)
        gains[variant.label] = best[setup.batches[-1]] / best[1]
    largest = setup.batches[-1]
    for label, gain in gains.items():
        print(f"\n{label}: batching gain (raw, batch {largest} / batch 1) {gain:.2f}x")
    if args.gpu:
        print(f"peak GPU memory (raw and service runs): {peak / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

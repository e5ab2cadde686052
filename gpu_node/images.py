"""PNG files with their generation parameters in text chunks."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo

from gpu_node.calls import SAMPLER_LABELS

if TYPE_CHECKING:
    from PIL.Image import Image

PARAMETERS_CHUNK = "parameters"  # AUTOMATIC1111's chunk, read by most SD tools
MANIFEST_CHUNK = "sdapi"


@dataclass(frozen=True)
class ImageManifest:
    """Everything needed to make an image again, written into its PNG."""

    generation_id: str
    index: int
    model: str
    model_hash: str
    scheduler: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    prompt: str
    negative_prompt: str
    versions: Mapping[str, str] = field(default_factory=dict)
    # img2img / inpainting: what the image was made from.
    init_image_sha256: str | None = None
    mask_sha256: str | None = None
    strength: float | None = None
    # (name, weight, tensor SHA-256) of each LoRA applied.
    loras: tuple[tuple[str, float, str], ...] = ()

    def parameters_text(self) -> str:
        """The AUTOMATIC1111 `parameters` text."""
        # A1111 writes the LoRAs as the prompt tags that asked for them.
        tags = "".join(f" <lora:{name}:{weight:g}>" for name, weight, _ in self.loras)
        lines = [self.prompt + tags]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        settings = [
            f"Steps: {self.steps}",
            f"Sampler: {SAMPLER_LABELS.get(self.scheduler, self.scheduler)}",
            f"CFG scale: {self.guidance_scale:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
            f"Model hash: {self.model_hash[:10]}",
            f"Model: {self.model}",
        ]
        if self.init_image_sha256 is not None:
            settings.append(f"Denoising strength: {self.strength:g}")
            settings.append(f"Init image hash: {self.init_image_sha256[:10]}")
        if self.mask_sha256 is not None:
            settings.append(f"Mask hash: {self.mask_sha256[:10]}")
        if self.loras:
            hashes = ", ".join(f"{name}: {sha[:10]}" for name, _, sha in self.loras)
            settings.append(f'Lora hashes: "{hashes}"')
        if "diffusers" in self.versions:
            settings.append(f"Version: diffusers {self.versions['diffusers']}")
        lines.append(", ".join(settings))
        return "\n".join(lines)

    def to_json(self) -> str:
        """The `sdapi` manifest chunk."""
        data: dict[str, Any] = {
            "generation_id": self.generation_id,
            "index": self.index,
            "model": self.model,
            "model_hash": self.model_hash,
            "scheduler": self.scheduler,
            "seed": self.seed,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "width": self.width,
            "height": self.height,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "versions": dict(self.versions),
        }
        if self.init_image_sha256 is not None:
            data["init_image_sha256"] = self.init_image_sha256
            data["strength"] = self.strength
        if self.mask_sha256 is not None:
            data["mask_sha256"] = self.mask_sha256
        if self.loras:
            data["loras"] = [
                {"name": name, "weight": weight, "sha256": sha}
                for name, weight, sha in self.loras
            ]
        return json.dumps(data, ensure_ascii=False, sort_keys=True)


def encode_png(image: Image, manifest: ImageManifest) -> bytes:
    """PNG bytes with both text chunks (CPU work: call it in a thread)."""
    info = PngInfo()
    # add_text writes iTXt (UTF-8) when the text is not Latin-1.
    info.add_text(PARAMETERS_CHUNK, manifest.parameters_text())
    info.add_text(MANIFEST_CHUNK, manifest.to_json())
    buffer = io.BytesIO()
    # zlib's fastest level: the same pixels, 2.6x faster than level 6 at
    # 512x512 (22 against 57 ms, on the premium request's path) for files
    # 7-12% larger (docs/BENCHMARKS.md).
    image.save(buffer, format="PNG", pnginfo=info, compress_level=1)
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of some bytes."""
    return hashlib.sha256(data).hexdigest()


class InputError(ValueError):
    """An input image from Redis is not what its hash names, or not an image."""


# Inputs come from `web`, which already refused anything larger; this bounds
# what a node decodes from a Redis payload it does not trust (pixels).
INPUT_PIXELS_MAX = 4096 * 4096


def load_input(data: bytes, digest: str, mode: str, size: tuple[int, int]) -> Image:
    """Decode an input image checked against its SHA-256, in `mode`, at `size`.

    A mask (mode "L") is binarized as diffusers does (>= 50% repaints), so the
    pixels kept outside it are exactly those the pipeline kept. CPU work: call
    it in a thread.
    """
    if sha256_hex(data) != digest:
        raise InputError("an input image does not match its SHA-256")
    try:
        with PILImage.open(io.BytesIO(data), formats=["PNG"]) as opened:
            if opened.width * opened.height > INPUT_PIXELS_MAX:
                raise InputError("an input image is too large")
            image = opened.convert(mode)
    except (OSError, PILImage.DecompressionBombError) as exc:
        raise InputError(f"an input image cannot be decoded: {exc}") from None
    if image.size != size:
        image = image.resize(size, PILImage.Resampling.LANCZOS)
    if mode == "L":
        image = image.point(lambda value: 255 if value >= 128 else 0)
    return image

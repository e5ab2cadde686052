"""PNG files with their generation parameters in text chunks."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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

    def parameters_text(self) -> str:
        """The AUTOMATIC1111 `parameters` text."""
        lines = [self.prompt]
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
        return json.dumps(data, ensure_ascii=False, sort_keys=True)


def encode_png(image: Image, manifest: ImageManifest) -> bytes:
    """PNG bytes with both text chunks (CPU work: call it in a thread)."""
    info = PngInfo()
    # add_text writes iTXt (UTF-8) when the text is not Latin-1.
    info.add_text(PARAMETERS_CHUNK, manifest.parameters_text())
    info.add_text(MANIFEST_CHUNK, manifest.to_json())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=6)
    return buffer.getvalue()


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of some bytes."""
    return hashlib.sha256(data).hexdigest()

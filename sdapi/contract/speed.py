"""What a GPU node learned of its speed, as it publishes it under `speed_key`.

One hash per model; each node writes one field per size bucket it ran
(`speed_field`) and one for its model loads (`load_field`), each the JSON of
a record below. Readers estimate run times from them (`sdapi.infra.eta`).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

# Field of a node's model loads in a model's speed hash.
LOAD_BUCKET = "load"


class SpeedRecord(BaseModel):
    """A node's learned speed at one size bucket of one model.

    A job of `images` images and `steps` denoising steps took about
    `job_s + images * (overhead_s + steps * step_s)` seconds there.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    # The pixels (width * height) of the last call measured in this bucket:
    # another size in the bucket is scaled from it.
    pixels: int = Field(ge=1)
    # Seconds per denoising step of one image.
    step_s: float = Field(ge=0, allow_inf_nan=False)
    # Seconds per image outside the steps (prompt encoding, VAE decode).
    overhead_s: float = Field(ge=0, allow_inf_nan=False)
    # Seconds per job outside its pipeline calls: claiming it, preparing the
    # prompts, encoding and handing over the PNGs.
    job_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    samples: int = Field(ge=1)
    # Unix time of the last measurement.
    at: float

    def call_s(self, pixels: int, steps: int, images: int) -> float:
        """Seconds the pipeline calls of this shape take, scaled to `pixels`
        linearly."""
        scale = pixels / self.pixels
        return images * scale * (self.overhead_s + steps * self.step_s)

    def job_run_s(self, pixels: int, steps: int, images: int) -> float:
        """Seconds a job of this shape takes from its claim to its images."""
        return self.job_s + self.call_s(pixels, steps, images)


class LoadRecord(BaseModel):
    """A node's learned time to load one model from disk."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    load_s: float = Field(ge=0, allow_inf_nan=False)
    samples: int = Field(ge=1)
    at: float


def size_bucket(width: int, height: int) -> int:
    """Half-octaves of pixels: 512x512 and 512x640 share one, 768x768 not."""
    return round(2 * math.log2(max(width * height, 1)))


def speed_field(node_id: str, bucket: int) -> str:
    """The field of a node's `SpeedRecord` of one bucket in a speed hash."""
    return f"{node_id}|{bucket}"


def load_field(node_id: str) -> str:
    """The field of a node's `LoadRecord` in a speed hash."""
    return f"{node_id}|{LOAD_BUCKET}"


def parse_field(field: str) -> tuple[str, str]:
    """(node id, bucket or LOAD_BUCKET) of a speed hash field."""
    node_id, _, bucket = field.rpartition("|")
    return node_id, bucket

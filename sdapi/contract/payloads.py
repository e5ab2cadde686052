"""Job payloads (producers -> GPU node) and results (GPU node -> jobs).

Everything that crosses Redis is one of these models, dumped with
``model_dump(mode="json")`` and validated again on the other side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sdapi.contract.status import Status, Tier

SEED_MAX = 2**32 - 1


# Unknown fields are ignored, not refused: during a rolling deploy a producer
# that already sends a new field must not make an older consumer fail its jobs
# (or drop its events) for good. Fields are only ever added with defaults.
_CONTRACT = ConfigDict(extra="ignore", frozen=True)

# Upper bounds a node enforces whatever a producer sends (web's own limits
# are lower): a payload in Redis is not trusted to be sane.
STEPS_MAX = 500
IMAGES_MAX = 64
PROMPT_MAX_CHARS = 10_000
SIZE_MAX = 4096


# What generations must share to run in one pipeline call (and one batch):
# `mode` and `strength` too, as img2img and inpainting are other pipelines and
# strength sets how many steps a call runs; and how prompts are read.
BATCH_KEY_FIELDS = (
    "width",
    "height",
    "steps",
    "guidance_scale",
    "scheduler",
    "mode",
    "strength",
    "prompt_syntax",
    # One set of LoRAs per call: adapters are set on the shared modules.
    "loras",
)
SHA256_PATTERN = r"^[0-9a-f]{64}$"
# Strength when a request gives none: diffusers' own defaults for img2img and
# for inpainting (which repaints the masked area from noise).
DEFAULT_STRENGTH = 0.8
INPAINT_DEFAULT_STRENGTH = 1.0


def default_strength(inpainting: bool) -> float:
    """The strength of a request that names none."""
    return INPAINT_DEFAULT_STRENGTH if inpainting else DEFAULT_STRENGTH


class Mode(StrEnum):
    """What a generation starts from: noise, an image, or an image and a mask."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"


LORAS_MAX = 4
LORA_WEIGHT_MAX = 4.0
# A LoRA file's stem: what `<lora:name:weight>` can name (no ":" or ">").
LORA_NAME_PATTERN = r"^[^:<>/\\\x00]{1,100}$"


# A1111's prompt tag: <lora:name> or <lora:name:weight>.
LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^:<>]*))?>", re.IGNORECASE)


def take_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its `<lora:name:weight>` tags, and the tags' LoRAs.

    Raises ValueError naming a tag whose weight is not a number.
    """
    found: list[tuple[str, float]] = []

    def take(match: re.Match[str]) -> str:
        name, weight = match.group(1).strip(), (match.group(2) or "").strip()
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"{match.group(0)}: the weight is not a number") from None
        found.append((name, value))
        return " "

    cleaned = LORA_TAG.sub(take, prompt)
    if not found:
        return prompt, []
    return " ".join(cleaned.split()), found


class LoraSpec(BaseModel):
    """One LoRA applied to a generation, by its file name on the node."""

    model_config = _CONTRACT

    name: str = Field(pattern=LORA_NAME_PATTERN)
    weight: float = Field(
        default=1.0, ge=-LORA_WEIGHT_MAX, le=LORA_WEIGHT_MAX, allow_inf_nan=False
    )
    # The file's SHA-256 as its nodes announced it ("" when not known):
    # another file under the same name is another batch.
    sha256: str = ""


class GenerationParams(BaseModel):
    """What the pipeline needs for one generation, already validated by `web`."""

    model_config = _CONTRACT

    prompt: str = Field(max_length=PROMPT_MAX_CHARS)
    negative_prompt: str = Field(default="", max_length=PROMPT_MAX_CHARS)
    width: int = Field(ge=8, le=SIZE_MAX, multiple_of=8)
    height: int = Field(ge=8, le=SIZE_MAX, multiple_of=8)
    steps: int = Field(ge=1, le=STEPS_MAX)
    guidance_scale: float = Field(ge=0, allow_inf_nan=False)
    seed: int = Field(ge=0, le=SEED_MAX)
    num_images: int = Field(ge=1, le=IMAGES_MAX)
    scheduler: str
    # Inputs travel by reference: the node fetches them from Redis by hash.
    init_image_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    mask_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    # Only with an init image: the share of `steps` that denoises it (0..1).
    strength: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    # "a1111": AUTOMATIC1111's emphasis syntax and BREAK; "plain": literal text.
    prompt_syntax: Literal["a1111", "plain"] = "a1111"
    loras: tuple[LoraSpec, ...] = Field(default=(), max_length=LORAS_MAX)

    @model_validator(mode="after")
    def _inputs_consistent(self) -> GenerationParams:
        if self.mask_sha256 is not None and self.init_image_sha256 is None:
            raise ValueError("a mask needs an init image")
        if self.init_image_sha256 is None and self.strength is not None:
            raise ValueError("strength needs an init image")
        names = [lora.name for lora in self.loras]
        if len(set(names)) != len(names):
            raise ValueError("a LoRA is named twice")
        return self

    @property
    def mode(self) -> Mode:
        """txt2img, img2img or inpaint, from the inputs given."""
        if self.init_image_sha256 is None:
            return Mode.TXT2IMG
        return Mode.INPAINT if self.mask_sha256 is not None else Mode.IMG2IMG

    @property
    def effective_strength(self) -> float:
        """The strength the pipeline runs with (1 without an init image)."""
        if self.init_image_sha256 is None:
            return 1.0
        if self.strength is None:
            return default_strength(self.mask_sha256 is not None)
        return self.strength

    @property
    def denoising_steps(self) -> int:
        """Steps a call actually runs: diffusers runs int(steps * strength) of
        them from an init image (0: the input comes back unchanged)."""
        if self.mode is Mode.TXT2IMG:
            return self.steps
        return min(int(self.steps * self.effective_strength), self.steps)

    def input_hashes(self) -> list[str]:
        """SHA-256 of every input image the node must fetch."""
        return [
            digest
            for digest in (self.init_image_sha256, self.mask_sha256)
            if digest is not None
        ]

    def image_seeds(self) -> list[int]:
        """Image i uses seed + i (wrapping), as AUTOMATIC1111 does."""
        return [(self.seed + i) % (SEED_MAX + 1) for i in range(self.num_images)]

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> GenerationParams:
        """The node's view of a client's resolved request (other fields dropped)."""
        return cls.model_validate(
            {name: request[name] for name in cls.model_fields if name in request}
        )

    def batch_key(self) -> tuple[object, ...]:
        """Generations with equal keys can share one pipeline call."""
        return tuple(
            self.effective_strength if name == "strength" else getattr(self, name)
            for name in BATCH_KEY_FIELDS
        )


class GenerationJob(BaseModel):
    """Payload of `generate`: one generation, and one item of a batch."""

    model_config = _CONTRACT

    generation_id: UUID
    model: str
    tier: Tier
    params: GenerationParams
    attempt: int = Field(default=1, ge=1)


class BatchJob(BaseModel):
    """Payload of `generate_batch`: compatible generations run in one call."""

    model_config = _CONTRACT

    batch_id: UUID
    model: str
    items: list[GenerationJob] = Field(min_length=1, max_length=IMAGES_MAX)
    attempt: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _compatible(self) -> BatchJob:
        keys = {item.params.batch_key() for item in self.items}
        if len(keys) != 1:
            raise ValueError(
                "batch items differ in mode, size, steps, strength, guidance, "
                "scheduler, prompt syntax or LoRAs"
            )
        if any(item.model != self.model for item in self.items):
            raise ValueError("batch items must all use the batch's model")
        return self

    @property
    def image_count(self) -> int:
        return sum(item.params.num_images for item in self.items)


JOB_TIMEOUT_MAX_S = 6 * 3600


def job_timeout_s(
    params: GenerationParams,
    images: int,
    *,
    base_s: float = 60.0,
    seconds_per_image_step: float = 2.0,
) -> float:
    """A generous time limit for `images` images of `params`, in seconds.

    `seconds_per_image_step` is the slowest plausible speed at 512x512 (an
    SD-1.5 step on a CPU is ~4 s; on any GPU well under 0.1 s); size scales it.
    """
    pixels = params.width * params.height / (512 * 512)
    estimate = params.steps * images * seconds_per_image_step * max(pixels, 0.25)
    return min(JOB_TIMEOUT_MAX_S, base_s + estimate)


class ErrorInfo(BaseModel):
    """Why a generation failed, as the user sees it."""

    model_config = _CONTRACT

    code: str
    message: str


class ImageInfo(BaseModel):
    """One image a node made; its PNG waits under `image_key`."""

    model_config = _CONTRACT

    index: int = Field(ge=0)
    seed: int = Field(ge=0, le=SEED_MAX)
    width: int
    height: int
    sha256: str
    size_bytes: int


class StartedNotice(BaseModel):
    """Payload of `mark_started`."""

    model_config = _CONTRACT

    generation_id: UUID
    attempt: int = 1
    node_id: str
    started_at: datetime


class GenerationResult(BaseModel):
    """Payload of `store_result`: how one attempt of a generation ended."""

    model_config = _CONTRACT

    generation_id: UUID
    attempt: int = 1
    status: Literal[Status.SUCCEEDED, Status.FAILED, Status.CANCELLED]
    images: list[ImageInfo] = []
    error: ErrorInfo | None = None
    node_id: str
    model: str
    model_hash: str = ""
    started_at: datetime | None = None
    finished_at: datetime

    @model_validator(mode="after")
    def _consistent(self) -> GenerationResult:
        if self.status is Status.SUCCEEDED and not self.images:
            raise ValueError("a succeeded result carries its images")
        if self.status is Status.FAILED and self.error is None:
            raise ValueError("a failed result says why")
        return self

"""Public models of generations (requests, responses, lists)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sdapi.contract.payloads import (
    LORA_NAME_PATTERN,
    LORA_WEIGHT_MAX,
    LORAS_MAX,
    SEED_MAX,
    LoraSpec,
)
from sdapi.contract.status import Status, Tier
from web.schemas.base import RequestModel
from web.schemas.webhooks import WebhookRequest, WebhookState

PROMPT_MAX = 2000
IMAGE_INDEX_MAX = 9999
SHA256_HEX = r"^[0-9a-f]{64}$"
# Some text that is not white space (as Python's str.strip() sees it), no NUL.
PROMPT_WORDS = r"^[^\x00]*[^\s\x00][^\x00]*$"


class ImageReference(RequestModel):
    """One of your own earlier results, used as an input ("use this result")."""

    generation_id: UUID
    index: int = Field(ge=0, le=IMAGE_INDEX_MAX)


_IMAGE_INPUT = (
    "Base64 PNG, JPEG or WebP (a data: URL works too), or "
    "{generation_id, index} of one of your own results; in multipart form "
    "data, a file part of this name."
)


def _or_null(schema: dict[str, Any]) -> None:
    """Publish that a text field also takes null (a before-validator reads it)."""
    text = {key: schema.pop(key) for key in ("type", "maxLength") if key in schema}
    schema["anyOf"] = [text, {"type": "null"}]


class LoraRequest(RequestModel):
    """A LoRA file the model's nodes have, and how strongly to apply it."""

    name: str = Field(pattern=LORA_NAME_PATTERN)
    weight: float = Field(
        default=1.0, ge=-LORA_WEIGHT_MAX, le=LORA_WEIGHT_MAX, allow_inf_nan=False
    )


class GenerationRequest(RequestModel):
    """What a client asks for; omitted fields take the model's defaults."""

    # `_prompt_has_words` enforces the pattern, with a clearer message.
    prompt: str = Field(
        min_length=1,
        max_length=PROMPT_MAX,
        json_schema_extra={"pattern": PROMPT_WORDS},
    )
    negative_prompt: str = Field(
        default="",
        max_length=PROMPT_MAX,
        description="null or absent: none",
        json_schema_extra=_or_null,
    )
    model: str | None = Field(default=None, max_length=200)
    # Unset: 512, or the model's own default size when it cannot make 512.
    width: int | None = Field(
        default=None,
        ge=64,
        multiple_of=8,
        description="Pixels; default 512 (the model's default if it is smaller)",
    )
    height: int | None = Field(
        default=None,
        ge=64,
        multiple_of=8,
        description="Pixels; default 512 (the model's default if it is smaller)",
    )
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(default=None, ge=0, le=50, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    num_images: int = Field(default=1, ge=1)
    scheduler: str | None = Field(default=None, max_length=32)
    prompt_syntax: Literal["a1111", "plain"] = Field(
        default="a1111",
        description="a1111: AUTOMATIC1111's emphasis syntax, (word:1.3), "
        "(word) = x1.1, [word] = /1.1, \\( for a literal parenthesis, BREAK "
        "to start a new 75-token chunk; plain: the prompt taken literally.",
    )
    loras: list[LoraRequest] = Field(
        default=[],
        max_length=LORAS_MAX,
        description="LoRAs to apply (see GET /api/v1/models); <lora:name:weight> "
        "tags in the prompt are taken out of it and added here.",
    )
    delivery: Literal["download", "email"] | None = Field(
        default=None,
        description="How the images reach you; premium defaults to download, "
        "normal accepts only email.",
    )
    init_image: str | ImageReference | None = Field(
        default=None,
        description="img2img: the image to start from. "
        + _IMAGE_INPUT
        + " Width and height default to its size (scaled to your tier's limit, "
        "multiples of 8).",
    )
    strength: float | None = Field(
        default=None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="With init_image: how much to change it, 0 (returned as it "
        "is) to 1 (ignored); default 0.8, or 1 with a mask. int(strength * "
        "steps) steps run.",
    )
    mask: str | ImageReference | None = Field(
        default=None,
        description="Inpainting, with init_image: white pixels are repainted, "
        "black ones kept; the init image's size. " + _IMAGE_INPUT,
    )
    webhook: WebhookRequest | None = Field(
        default=None, description="POST these events to a URL, signed."
    )

    @field_validator("negative_prompt", mode="before")
    @classmethod
    def _no_negative_prompt(cls, value: object) -> object:
        # Clients send null for "none" as often as they leave it out.
        return "" if value is None else value

    @field_validator("prompt")
    @classmethod
    def _prompt_has_words(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("The prompt is empty.")
        return value


class ResolvedRequest(BaseModel):
    """The request as accepted: every default filled in, the seed chosen."""

    prompt: str
    negative_prompt: str
    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    scheduler: str
    # Absent from requests stored before it existed: those read as "a1111".
    prompt_syntax: Literal["a1111", "plain"] = "a1111"
    # With the SHA-256 their nodes announced (absent before LoRAs existed).
    loras: list[LoraSpec] = []
    delivery: Literal["download", "email"]
    # The inputs as stored (cleaned PNGs), by SHA-256; the images themselves
    # are never served back.
    init_image_sha256: str | None = Field(default=None, pattern=SHA256_HEX)
    mask_sha256: str | None = Field(default=None, pattern=SHA256_HEX)
    strength: float | None = None
    webhook: WebhookRequest | None = None


class ImageRef(BaseModel):
    index: int
    seed: int
    url: str
    width: int
    height: int


class Progress(BaseModel):
    step: int
    total: int


class EtaParts(BaseModel):
    """The estimated time in its two parts, kept apart."""

    wait_s: float = Field(
        description="Seconds until it starts running: the work ranked before "
        "it shared among the model's healthy nodes, a model load when none has "
        "it loaded, or (normal tier) the time until `scheduled_for`; 0 once "
        "running"
    )
    run_s: float = Field(
        description="Seconds it then runs (once running: the seconds left)"
    )


ETA_DESCRIPTION = (
    "Estimated seconds from now until it finishes (`eta.wait_s` + "
    "`eta.run_s`), from the measured speed of the nodes serving its model; "
    "null when finished, and while it cannot be known honestly: no node has "
    "run the model yet (nothing learned), no healthy node serves it, or it "
    "left the queue."
)


class ErrorRef(BaseModel):
    code: str
    message: str


class Notice(BaseModel):
    """Something the user should know about a finished generation."""

    code: str
    message: str


class GenerationView(BaseModel):
    """A generation as clients see it."""

    model_config = ConfigDict(title="Generation")

    id: str
    status: Status
    tier: Tier
    request: ResolvedRequest
    created_at: datetime
    scheduled_for: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    queue_position: int | None
    waiting_for_node: bool = Field(
        default=False,
        description="Queued while no healthy GPU node serves its model (scaled "
        "to zero, restarting): it runs when one comes up, or fails as "
        "`model_unavailable` after the queue's time limit.",
    )
    progress: Progress | None
    eta_s: float | None = Field(default=None, description=ETA_DESCRIPTION)
    eta: EtaParts | None = Field(
        default=None, description="`eta_s` in its parts; null with it"
    )
    images: list[ImageRef]
    error: ErrorRef | None
    delivery: Literal["download", "email"]
    emailed_at: datetime | None
    warnings: list[Notice] = []
    webhook: WebhookState | None = None


class GenerationList(BaseModel):
    items: list[GenerationView]
    next: str | None = Field(description="Pass as `before` for the next page")


class ListQuery(RequestModel):
    limit: int = Field(default=20, ge=1, le=100)
    before: str | None = Field(default=None, description="A `next` cursor")


class DeleteQuery(RequestModel):
    purge: bool = Field(
        default=False,
        description="Delete a finished generation and its images for good.",
    )


class ImageQuery(RequestModel):
    """A signed link from an email authenticates the download by itself."""

    expires: int | None = Field(
        default=None, ge=0, le=2**53, description="Unix time the link stops working"
    )
    signature: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="HMAC-SHA256, hex"
    )

"""The OpenAI Images API's request and response shapes (`/v1/images/generations`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from web.schemas.base import RequestModel
from web.schemas.generations import PROMPT_MAX, PROMPT_WORDS

AUTO_SIZE = "auto"


def _absent_if_none(value: object) -> bool:
    return value is None


class ImageGenerationRequest(RequestModel):
    """OpenAI's `images.generate` parameters that apply to Stable Diffusion."""

    # A blank prompt is refused when it becomes a GenerationRequest.
    prompt: str = Field(
        min_length=1,
        max_length=PROMPT_MAX,
        json_schema_extra={"pattern": PROMPT_WORDS},
    )
    n: int | None = Field(default=None, ge=1, le=10, description="Images (default 1)")
    size: str | None = Field(
        default=None,
        pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$",
        description='"WIDTHxHEIGHT" in pixels, or "auto" (the model\'s default)',
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None,
        description="`url` (default): links that work without credentials for "
        "an hour; `b64_json`: the PNGs inline",
    )
    model: str | None = Field(default=None, max_length=200)
    user: str | None = Field(
        default=None,
        max_length=256,
        description="Your end user's id; accepted for compatibility, not stored",
    )


class ImageEditRequest(RequestModel):
    """OpenAI's `images.edit` parameters (multipart form data) that apply here."""

    image: bytes = Field(
        description="The PNG, JPEG or WebP to edit. Without a mask, its fully "
        "transparent pixels (if any) mark the area to repaint; an opaque image "
        "is redrawn as a whole (img2img at strength 0.8)."
    )
    mask: bytes | None = Field(
        default=None,
        description="A PNG of the image's size whose fully transparent pixels "
        "mark the area to repaint",
    )
    # A blank prompt is refused when it becomes a GenerationRequest.
    prompt: str = Field(
        min_length=1,
        max_length=PROMPT_MAX,
        json_schema_extra={"pattern": PROMPT_WORDS},
    )
    n: int | None = Field(default=None, ge=1, le=10, description="Images (default 1)")
    size: str | None = Field(
        default=None,
        pattern=r"^(auto|[0-9]{1,5}x[0-9]{1,5})$",
        description='"WIDTHxHEIGHT" in pixels, or "auto" (default: the image\'s '
        "size, scaled to fit)",
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        default=None,
        description="`url` (default): links that work without credentials for "
        "an hour; `b64_json`: the PNGs inline",
    )
    model: str | None = Field(default=None, max_length=200)
    user: str | None = Field(
        default=None,
        max_length=256,
        description="Your end user's id; accepted for compatibility, not stored",
    )


class ImageData(BaseModel):
    """One image: a link or the PNG, as asked by `response_format`."""

    url: str | None = Field(default=None, exclude_if=_absent_if_none)
    b64_json: str | None = Field(default=None, exclude_if=_absent_if_none)
    # Stable Diffusion uses the prompt as given; present only if it was changed.
    revised_prompt: str | None = Field(default=None, exclude_if=_absent_if_none)


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time the request was accepted")
    data: list[ImageData]


class OpenAIErrorDetail(BaseModel):
    field: str
    message: str


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    # Not in OpenAI's shape (its clients ignore it): one entry per bad field.
    details: list[OpenAIErrorDetail] = []


class OpenAIErrorBody(BaseModel):
    """Errors under /v1/ use the OpenAI API's shape."""

    error: OpenAIError

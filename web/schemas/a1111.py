"""The AUTOMATIC1111 web UI API's request and response shapes (`/sdapi/v1/...`).

Field names, defaults and answers as A1111 has them, so its clients work
unchanged. What each field does here is decided in `web.a1111_requests`: the
fields that change nothing here are accepted, those that would change the
output in a way we cannot reproduce are refused by name.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

from sdapi.contract.payloads import SEED_MAX
from web.schemas.base import NO_NUL, RequestModel
from web.schemas.generations import PROMPT_MAX, PROMPT_WORDS

# Fields A1111's own request models do not have are ignored, as A1111 (a
# pydantic model with extra="ignore") ignores them: they are named in this
# response header, so a client can see what had no effect.
IGNORED_FIELDS_HEADER = "X-Sdapi-Ignored-Fields"

_SEED = "-1: random; else 0..2^32-1 (image i of the request uses seed + i)"

# The A1111 options that describe what this service does, at their values:
# GET /sdapi/v1/options shows them, and a request may "set" them to these.
FIXED_OPTIONS: dict[str, Any] = {
    "samples_format": "png",
    "CLIP_stop_at_last_layers": 1,
    "eta_ancestral": 1.0,
    "eta_ddim": 0.0,
    "sd_vae": "Automatic",
    "emphasis": "Original",
    "return_grid": False,
}
CHECKPOINT_OPTION = "sd_model_checkpoint"


def _only(*values: object) -> dict[str, Any]:
    """Field arguments publishing the only values a field takes here: the ones
    that change nothing (web.a1111_requests refuses others, naming the field)."""
    shown = ", ".join(json.dumps(value) for value in values)
    return {
        "description": f"Only {shown} here",
        "json_schema_extra": {"enum": list(values)},
    }


_ONLY_EMPTY_LIST: dict[str, Any] = {"json_schema_extra": {"maxItems": 0}}


def _options_schema(schema: dict[str, Any]) -> None:
    """Options a request may set: a model, and the others at their values."""
    text = {"type": "string", "maxLength": 300, "pattern": NO_NUL}
    schema["properties"] = {
        CHECKPOINT_OPTION: {"anyOf": [text, {"type": "null"}]},
        **{key: {"const": value} for key, value in FIXED_OPTIONS.items()},
    }
    schema["additionalProperties"] = False


class _A1111Request(RequestModel):
    # Unknown fields are kept (not forbidden) so they can be reported.
    model_config = ConfigDict(extra="allow")


class Txt2ImgRequest(_A1111Request):
    """`POST /sdapi/v1/txt2img`: A1111's StableDiffusionTxt2ImgProcessingAPI."""

    prompt: str = Field(
        min_length=1, max_length=PROMPT_MAX, json_schema_extra={"pattern": PROMPT_WORDS}
    )
    negative_prompt: str = Field(default="", max_length=PROMPT_MAX)
    styles: list[str] = Field(
        default=[], description="Must be empty (no styles)", **_ONLY_EMPTY_LIST
    )
    seed: int = Field(default=-1, ge=-1, le=SEED_MAX, description=_SEED)
    subseed: int = Field(default=-1, description="No effect while subseed_strength=0")
    subseed_strength: float = Field(default=0.0, **_only(0))
    seed_resize_from_h: int = Field(default=-1, **_only(-1, 0))
    seed_resize_from_w: int = Field(default=-1, **_only(-1, 0))
    sampler_name: str | None = Field(
        default=None,
        max_length=64,
        description='A name or alias of GET /sdapi/v1/samplers; default "Euler"',
    )
    sampler_index: str | None = Field(
        default=None, max_length=64, description="Old name of sampler_name"
    )
    scheduler: str | None = Field(
        default=None,
        max_length=32,
        description='"automatic" (the sampler\'s own) or "karras"',
    )
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(
        default=1, ge=1, description="batch_size x n_iter images in one generation"
    )
    steps: int = Field(default=50, ge=1)
    cfg_scale: float = Field(default=7.0, ge=0, le=50, allow_inf_nan=False)
    width: int = Field(default=512, ge=64, multiple_of=8)
    height: int = Field(default=512, ge=64, multiple_of=8)
    restore_faces: bool | None = Field(default=None, **_only(False, None))
    tiling: bool | None = Field(default=None, **_only(False, None))
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(
        default=None,
        description="Only the sampler's own: 1 for ancestral samplers, 0 for DDIM",
    )
    denoising_strength: float | None = Field(
        default=None, description="Used by img2img; no effect without enable_hr"
    )
    s_min_uncond: float = Field(default=0.0, **_only(0))
    s_churn: float = Field(default=0.0, **_only(0))
    s_tmax: float | None = Field(default=None, **_only(0, None))
    s_tmin: float = Field(default=0.0, **_only(0))
    s_noise: float = Field(default=1.0, **_only(1))
    override_settings: dict[str, Any] = Field(
        default={},
        description="sd_model_checkpoint picks the model for this request; other "
        "options only with the value GET /sdapi/v1/options shows",
        json_schema_extra=_options_schema,
    )
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = Field(default=None, **_only("", None))
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = Field(default=False, **_only(False))
    firstpass_image: str | None = Field(default=None, **_only(None))
    comments: dict[str, Any] | None = None
    enable_hr: bool = Field(default=False, **_only(False))
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    script_name: str | None = Field(default=None, **_only("", None))
    script_args: list[Any] = Field(default=[], **_ONLY_EMPTY_LIST)
    send_images: bool = Field(default=True, description="false: no images answered")
    save_images: bool = Field(
        default=False, description="No effect: results are always kept"
    )
    alwayson_scripts: dict[str, Any] = Field(
        default={},
        description="Must be empty (no extensions)",
        json_schema_extra={"maxProperties": 0},
    )
    infotext: str | None = Field(default=None, **_only(None))


class Img2ImgRequest(Txt2ImgRequest):
    """`POST /sdapi/v1/img2img`: A1111's StableDiffusionImg2ImgProcessingAPI."""

    init_images: list[str] = Field(
        min_length=1,
        max_length=1,
        description="One base64 PNG, JPEG or WebP (a data: URL works too)",
    )
    resize_mode: int = Field(default=0, **_only(0))
    denoising_strength: float | None = Field(
        default=0.75,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="0 returns the image, 1 ignores it; int(strength*steps) run",
    )
    image_cfg_scale: float | None = None
    mask: str | None = Field(
        default=None,
        description="Inpainting: base64 image of init_images[0]'s size, white = "
        "repaint",
    )
    mask_blur_x: int = Field(default=4, ge=0, le=64)
    mask_blur_y: int = Field(default=4, ge=0, le=64)
    mask_blur: int | None = Field(
        default=None, ge=0, le=64, description="Sets mask_blur_x and mask_blur_y"
    )
    mask_round: bool = True
    inpainting_fill: int | None = Field(
        default=None, description="Absent or 1 (original): what the pipeline does"
    )
    inpaint_full_res: bool | None = Field(
        default=None, description="With a mask, must be false (whole picture)"
    )
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(
        default=0, ge=0, le=1, description="1: black pixels are repainted"
    )
    initial_noise_multiplier: float | None = Field(default=None, **_only(1, None))
    latent_mask: str | None = Field(default=None, **_only(None))
    include_init_images: bool = Field(
        default=False, description="Echo init_images and mask in `parameters`"
    )


class TextToImageResponse(BaseModel):
    """A1111's TextToImageResponse / ImageToImageResponse."""

    images: list[str] = Field(description="Base64 PNGs (none if send_images=false)")
    parameters: dict[str, Any] = Field(description="The request as understood")
    info: str = Field(
        description="JSON text: seed, all_seeds, subseed, all_subseeds, prompt, "
        "infotexts... (a repeat with these seeds gives the same pixels)"
    )


class ProgressQuery(RequestModel):
    skip_current_image: bool = False


class ProgressState(BaseModel):
    """A1111's `shared.state`, for the caller's work."""

    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = Field(description="The running generation's id, or empty")
    job_count: int = Field(description="The caller's generations queued or running")
    job_timestamp: str = Field(description="When it started, YYYYmmddHHMMSS, or 0")
    job_no: int = 0
    sampling_step: int
    sampling_steps: int


class ProgressResponse(BaseModel):
    progress: float = Field(ge=0, le=1, description="The running generation's steps")
    eta_relative: float = Field(
        ge=0,
        description="Seconds its remaining steps take at its measured step rate "
        "(0 when nothing runs; time in the queue is never counted)",
    )
    state: ProgressState
    current_image: str | None = Field(
        description="The latest step preview, base64 JPEG, if any"
    )
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, str]


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None


class SamplerList(RootModel[list[SamplerItem]]):
    pass


class SDModelList(RootModel[list[SDModelItem]]):
    pass


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class LoraList(RootModel[list[LoraItem]]):
    pass


class A1111Options(BaseModel):
    """The A1111 options that mean something here (GET shows them all)."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str = Field(description="Your default model's title")
    sd_checkpoint_hash: str | None = None
    samples_format: str = "png"


class A1111OptionsUpdate(RequestModel):
    """`POST /sdapi/v1/options`: sd_model_checkpoint sets your own default model;
    any other option only with the value it already has."""

    # Kept to be refused by name (web.a1111_requests), published as not taken.
    model_config = ConfigDict(extra="allow", json_schema_extra=_options_schema)

    sd_model_checkpoint: str | None = Field(default=None, max_length=300)


class A1111Empty(BaseModel):
    """An empty object, as A1111 answers `interrupt` and `options` changes."""


class A1111Error(BaseModel):
    """A1111's error shape (its API's exception handler), plus our `code`."""

    error: str = Field(description="A1111 names the exception: HTTPException")
    detail: str
    body: str = ""
    errors: str
    code: str = Field(description="sdapi's error code (docs/API.md)")


class A1111ValidationItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class A1111ValidationError(BaseModel):
    """FastAPI's 422, which A1111 answers invalid fields with."""

    detail: list[A1111ValidationItem]

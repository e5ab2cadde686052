"""From an AUTOMATIC1111 request to an sdapi generation, and back to A1111's answer.

A1111 clients send every field of its request model, most at values that
change nothing. Those are accepted; a value that would change the output in
a way our pipeline cannot reproduce (hires fix, face restoration, scripts,
subseeds...) is refused with a 422 naming the field, never dropped quietly.
"""

from __future__ import annotations

import io
import json
import math
import secrets
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from PIL import Image, ImageFilter, ImageOps
from pydantic import ValidationError

from sdapi.contract.payloads import SEED_MAX
from sdapi.infra.registry import ModelOffer
from web.a1111_samplers import ANCESTRAL, sampler_name
from web.errors import NotFound, ValidationFailed, from_validation_error
from web.schemas.a1111 import (
    CHECKPOINT_OPTION,
    FIXED_OPTIONS,
    Img2ImgRequest,
    Txt2ImgRequest,
)
from web.schemas.generations import GenerationRequest, ResolvedRequest
from web.uploads import CleanImage, as_png

# Our request's fields by the A1111 field they came from, for error details.
_A1111_FIELDS = {
    "num_images": "batch_size",
    "guidance_scale": "cfg_scale",
    "strength": "denoising_strength",
    "scheduler": "sampler_name",
    "model": f"override_settings.{CHECKPOINT_OPTION}",
    "init_image": "init_images.0",
    "loras": "prompt",
}
_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def a1111_error(error: ValidationFailed) -> ValidationFailed:
    """The same error with fields named as in the A1111 request."""
    details = [
        {**detail, "field": _A1111_FIELDS.get(detail["field"], detail["field"])}
        for detail in error.details
    ]
    return ValidationFailed(error.message, details=details)


def _problem(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def _same(value: object, wanted: object) -> bool:
    if isinstance(value, bool) or isinstance(wanted, bool):
        return value is wanted
    if isinstance(value, int | float) and isinstance(wanted, int | float):
        return math.isclose(value, wanted)
    return value == wanted


def option_problems(
    options: Mapping[str, Any], *, prefix: str = ""
) -> list[dict[str, str]]:
    """Each option that is not one of FIXED_OPTIONS at its value."""
    return [
        _problem(
            prefix + key,
            "Only sd_model_checkpoint, or an option at the value GET "
            "/sdapi/v1/options shows, can be set.",
        )
        for key, value in options.items()
        if not (key in FIXED_OPTIONS and _same(value, FIXED_OPTIONS[key]))
    ]


def unsupported(body: Txt2ImgRequest, scheduler: str) -> list[dict[str, str]]:
    """Each field whose value would change the output in a way we cannot."""
    problems = []
    refused: list[tuple[str, bool, str]] = [
        ("enable_hr", body.enable_hr, "The hires fix is not available."),
        (
            "restore_faces",
            bool(body.restore_faces),
            "Face restoration is not available.",
        ),
        ("tiling", bool(body.tiling), "Tiling is not available."),
        ("styles", bool(body.styles), "Saved styles are not available."),
        (
            "subseed_strength",
            body.subseed_strength != 0,
            "Variation seeds are not available: send 0.",
        ),
        (
            "seed_resize_from_h",
            body.seed_resize_from_h > 0,
            "Seed resizing is not available.",
        ),
        (
            "seed_resize_from_w",
            body.seed_resize_from_w > 0,
            "Seed resizing is not available.",
        ),
        ("s_min_uncond", body.s_min_uncond != 0, "Send 0."),
        ("s_churn", body.s_churn != 0, "Send 0."),
        ("s_tmax", bool(body.s_tmax), "Send 0 or null."),
        ("s_tmin", body.s_tmin != 0, "Send 0."),
        ("s_noise", not _same(body.s_noise, 1.0), "Send 1."),
        (
            "refiner_checkpoint",
            bool(body.refiner_checkpoint),
            "A refiner is not available.",
        ),
        (
            "disable_extra_networks",
            body.disable_extra_networks,
            "LoRA tags are always applied.",
        ),
        ("firstpass_image", body.firstpass_image is not None, "Send null."),
        ("script_name", bool(body.script_name), "Scripts are not available."),
        ("script_args", bool(body.script_args), "Scripts are not available."),
        (
            "alwayson_scripts",
            bool(body.alwayson_scripts),
            "Extensions (always-on scripts) are not available: send {}.",
        ),
        ("infotext", body.infotext is not None, "Send the fields themselves."),
    ]
    problems = [_problem(name, text) for name, bad, text in refused if bad]
    if body.eta is not None:
        own = 1.0 if scheduler in ANCESTRAL else 0.0
        if scheduler in ANCESTRAL or scheduler == "ddim":
            if not _same(body.eta, own):
                problems.append(
                    _problem("eta", f"This sampler runs with eta {own:g} only.")
                )
    problems += option_problems(
        {k: v for k, v in body.override_settings.items() if k != CHECKPOINT_OPTION},
        prefix="override_settings.",
    )
    if isinstance(body, Img2ImgRequest):
        problems += _img2img_unsupported(body)
    return problems


def _img2img_unsupported(body: Img2ImgRequest) -> list[dict[str, str]]:
    masked = body.mask is not None
    refused: list[tuple[str, bool, str]] = [
        ("resize_mode", body.resize_mode != 0, "Only 0 (just resize)."),
        ("latent_mask", body.latent_mask is not None, "Send null."),
        (
            "initial_noise_multiplier",
            not _same(body.initial_noise_multiplier or 1, 1),
            "Send 1.",
        ),
        (
            "inpainting_fill",
            masked and body.inpainting_fill not in (None, 1),
            "The masked area starts from the original (1); other fills are not "
            "available.",
        ),
        (
            "inpaint_full_res",
            masked and bool(body.inpaint_full_res),
            "Only the whole picture is inpainted: send false.",
        ),
    ]
    return [_problem(name, text) for name, bad, text in refused if bad]


def checkpoint_model(value: str, offers: Mapping[str, ModelOffer]) -> str:
    """The model an A1111 checkpoint name means: its title, name or file name
    (an A1111 "name.safetensors [hash]" title works too); 404 as A1111."""
    name = value.strip()
    if name.endswith("]") and " [" in name:
        name = name[: name.rindex(" [")]
    for suffix in _CHECKPOINT_SUFFIXES:
        name = name.removesuffix(suffix)
    if name in offers:
        return name
    known = ", ".join(sorted(offers)) or "none right now"
    raise NotFound(f"Model not found: {value!r} (available: {known}).")


def generation_request(
    body: Txt2ImgRequest, offer: ModelOffer, scheduler: str, *, strength: float | None
) -> GenerationRequest:
    """Our request for an A1111 one whose unsupported fields were refused."""
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "model": offer.id,
        "width": body.width,
        "height": body.height,
        "steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "seed": None if body.seed == -1 else body.seed,
        "num_images": body.batch_size * body.n_iter,
        "scheduler": scheduler,
        "delivery": "download",
        "strength": strength,
    }
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as exc:
        raise a1111_error(from_validation_error(exc)) from None


def edited_mask(data: bytes, blur_x: int, blur_y: int, invert: bool) -> CleanImage:
    """A1111's mask handling that changes what is repainted: inverted if asked,
    then blurred (A1111 blurs by 4 pixels unless told otherwise), so the
    result blends into the original over the blurred edge. Run in a thread."""
    with Image.open(io.BytesIO(data)) as opened:
        mask = opened.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    if blur_x or blur_y:
        mask = mask.filter(ImageFilter.GaussianBlur((blur_x, blur_y)))
    return as_png(mask)


def parameters(body: Txt2ImgRequest) -> dict[str, Any]:
    """The request as A1111 echoes it: every field with its value."""
    echoed = body.model_dump(mode="json", exclude=set(body.model_extra or {}))
    if isinstance(body, Img2ImgRequest) and not body.include_init_images:
        echoed["init_images"] = None
        echoed["mask"] = None
    return echoed


def _infotext(resolved: ResolvedRequest, seed: int, sampler: str, model: str) -> str:
    """A1111's parameters text of one image."""
    lines = [resolved.prompt]
    if resolved.negative_prompt:
        lines.append(f"Negative prompt: {resolved.negative_prompt}")
    settings = [
        f"Steps: {resolved.steps}",
        f"Sampler: {sampler}",
        f"CFG scale: {resolved.guidance_scale:g}",
        f"Seed: {seed}",
        f"Size: {resolved.width}x{resolved.height}",
        f"Model: {model}",
    ]
    if resolved.strength is not None:
        settings.append(f"Denoising strength: {resolved.strength:g}")
    if resolved.loras:
        hashes = ", ".join(
            f"{lora.name}: {lora.sha256[:12]}" for lora in resolved.loras
        )
        settings.append(f'Lora hashes: "{hashes}"')
    lines.append(", ".join(settings))
    return "\n".join(lines)


def info(
    body: Txt2ImgRequest,
    resolved: ResolvedRequest,
    seeds: Iterable[int],
    *,
    generation_id: str,
    started_at: datetime | None,
) -> str:
    """A1111's `info`: a JSON text whose seeds repeat the same pixels."""
    all_seeds = list(seeds)
    count = len(all_seeds)
    subseed = body.subseed if body.subseed >= 0 else secrets.randbelow(SEED_MAX)
    sampler = sampler_name(resolved.scheduler)
    prompt = body.prompt
    return json.dumps(
        {
            "prompt": prompt,
            "all_prompts": [prompt] * count,
            "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [body.negative_prompt] * count,
            "seed": resolved.seed,
            "all_seeds": all_seeds,
            "subseed": subseed,
            "all_subseeds": [(subseed + i) % (SEED_MAX + 1) for i in range(count)],
            "subseed_strength": 0,
            "width": resolved.width,
            "height": resolved.height,
            "sampler_name": sampler,
            "scheduler": "Karras" if "karras" in resolved.scheduler else "Automatic",
            "cfg_scale": resolved.guidance_scale,
            "steps": resolved.steps,
            "batch_size": body.batch_size,
            "n_iter": body.n_iter,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": resolved.model,
            "sd_model_hash": None,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": resolved.strength,
            "extra_generation_params": {"Lora": [lora.name for lora in resolved.loras]}
            if resolved.loras
            else {},
            "index_of_first_image": 0,
            "infotexts": [
                _infotext(resolved, seed, sampler, resolved.model) for seed in all_seeds
            ],
            "styles": [],
            "job_timestamp": started_at.strftime("%Y%m%d%H%M%S") if started_at else "0",
            "clip_skip": 1,
            "is_using_inpainting_conditioning": resolved.mask_sha256 is not None,
            "version": "sdapi",
            "generation_id": generation_id,
        }
    )

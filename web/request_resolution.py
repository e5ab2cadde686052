"""What a generation request asks for, made exact: its model's offer, its
size, steps and scheduler within the tier's limits, its LoRAs, and the input
images it names (web/generations.py accepts the result).

REST, the WebSocket, OpenAI's and A1111's routes all resolve through here, so
one request means the same thing whichever door it came in by.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

from aiohttp import web

from sdapi.contract.payloads import (
    LORA_WEIGHT_MAX,
    LORAS_MAX,
    LoraSpec,
    default_strength,
    take_lora_tags,
)
from sdapi.contract.status import Tier
from sdapi.db.models import InputRole
from sdapi.infra.deadline import Deadline
from sdapi.infra.registry import ModelOffer
from web.appkeys import registry_key, settings_key
from web.errors import Unavailable, ValidationFailed, field_error
from web.inputs import ResultRef, Source
from web.schemas import generations as schemas
from web.uploads import CleanImage, fit_size

# Retry-After when no healthy node serves the model, in seconds.
NO_NODE_RETRY_S = 30
# Width and height of a request that names none, in pixels (docs/API.md).
DEFAULT_SIZE = 512


async def find_offer(
    app: web.Application,
    model: str | None,
    *,
    deadline: Deadline,
    own_default: str | None = None,
) -> ModelOffer:
    """The offer of `model`, or of the default model when None (422 if unknown).

    The caller's `own_default` (User.default_model) comes first while known.

    Without a model the configured default wins while a node serves it, then
    any served model; an offline default is still returned so normal-tier
    requests can wait in the database for a node. Without Consul, the nodes
    are read from Redis: that counts against the request's `deadline`.
    """
    offers = await deadline.run(app[registry_key].offers())
    if model is not None:
        offer = offers.get(model)
        if offer is None:
            known = ", ".join(sorted(offers)) or "none right now"
            raise field_error("model", f"Unknown model {model!r} (available: {known}).")
        return offer
    if own_default is not None and own_default in offers:
        return offers[own_default]
    configured = app[settings_key].models
    default = offers.get(configured[0]) if configured else None
    served = [offer for offer in offers.values() if offer.available]
    if default is not None and default.available:
        return default
    if served:
        return served[0]
    if default is not None:
        return default
    raise Unavailable("No GPU node is serving any model.", retry_after=NO_NODE_RETRY_S)


def _default_size(model_max: int, model_default: int) -> int:
    # The contract's 512, unless the model cannot go that large (the tiny one).
    return DEFAULT_SIZE if DEFAULT_SIZE <= model_max else model_default


def resolve_request(
    body: schemas.GenerationRequest,
    offer: ModelOffer,
    tier: Tier,
    app: web.Application,
    inputs: Mapping[InputRole, CleanImage] | None = None,
) -> schemas.ResolvedRequest:
    """Apply the model's defaults and the tier's limits (422 per bad field)."""
    limits = app[settings_key].limits(tier)
    problems: list[dict[str, str]] = []
    inputs = inputs or {}
    init = inputs.get(InputRole.INIT_IMAGE)
    if init is not None:
        # An input's own size, scaled into what this tier and model allow.
        cap = min(limits.max_size, offer.max_width, offer.max_height)
        fitted = fit_size(init.width, init.height, cap)
        width = body.width or fitted[0]
        height = body.height or fitted[1]
    else:
        width = body.width or _default_size(offer.max_width, offer.default_width)
        height = body.height or _default_size(offer.max_height, offer.default_height)
    for field, value, model_max in (
        ("width", width, offer.max_width),
        ("height", height, offer.max_height),
    ):
        cap = min(limits.max_size, model_max)
        if value > cap:
            problems.append(
                {
                    "field": field,
                    "message": f"At most {cap} for your tier and this model.",
                }
            )
    steps = body.steps if body.steps is not None else offer.default_steps
    if steps > limits.max_steps:
        problems.append(
            {"field": "steps", "message": f"At most {limits.max_steps} for your tier."}
        )
    if body.num_images > limits.max_images:
        problems.append(
            {
                "field": "num_images",
                "message": f"At most {limits.max_images} images per request "
                "for your tier.",
            }
        )
    scheduler = body.scheduler or offer.default_scheduler
    if scheduler not in offer.schedulers:
        problems.append(
            {
                "field": "scheduler",
                "message": f"Unknown scheduler {scheduler!r} (one of "
                f"{', '.join(offer.schedulers)}).",
            }
        )
    prompt, loras = _resolve_loras(body, offer, problems)
    delivery = body.delivery or ("download" if tier is Tier.PREMIUM else "email")
    if tier is Tier.NORMAL and delivery != "email":
        problems.append(
            {
                "field": "delivery",
                "message": "Normal accounts get their images by email; "
                "download needs premium.",
            }
        )
    if problems:
        raise ValidationFailed(details=problems)
    return schemas.ResolvedRequest(
        prompt=prompt,
        loras=loras,
        negative_prompt=body.negative_prompt,
        model=offer.id,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=(
            body.guidance_scale
            if body.guidance_scale is not None
            else offer.default_guidance
        ),
        seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
        num_images=body.num_images,
        scheduler=scheduler,
        prompt_syntax=body.prompt_syntax,
        delivery=delivery,
        init_image_sha256=init.sha256 if init is not None else None,
        mask_sha256=mask.sha256 if (mask := inputs.get(InputRole.MASK)) else None,
        webhook=body.webhook,
        strength=(
            (
                body.strength
                if body.strength is not None
                else default_strength(InputRole.MASK in inputs)
            )
            if init is not None
            else None
        ),
    )


def _resolve_loras(
    body: schemas.GenerationRequest, offer: ModelOffer, problems: list[dict[str, str]]
) -> tuple[str, list[LoraSpec]]:
    """The prompt without its <lora:...> tags, and the LoRAs of the field and
    the tags, each one the model's nodes announced for its base kind."""
    try:
        prompt, tags = take_lora_tags(body.prompt)
    except ValueError as exc:
        problems.append({"field": "prompt", "message": f"{exc}."})
        return body.prompt, []
    if not prompt.strip():
        problems.append({"field": "prompt", "message": "The prompt is only LoRA tags."})
    wanted = [(lora.name, lora.weight) for lora in body.loras] + tags
    available = {lora.name: lora for lora in offer.loras}
    names = [name for name, _ in wanted]
    found: list[LoraSpec] = []
    for name, weight in wanted:
        lora = available.get(name)
        message = ""
        if len(wanted) > LORAS_MAX:
            message = f"At most {LORAS_MAX} LoRAs (field and prompt tags together)."
        elif names.count(name) > 1:
            message = f"LoRA {name!r} is given more than once."
        elif not math.isfinite(weight) or abs(weight) > LORA_WEIGHT_MAX:
            message = f"LoRA {name!r}: the weight must be within ±{LORA_WEIGHT_MAX:g}."
        elif lora is None:
            known = ", ".join(sorted(available)) or "none"
            message = f"Unknown LoRA {name!r} for {offer.id} (available: {known})."
        elif offer.lora_kind and lora.kind != offer.lora_kind:
            message = (
                f"LoRA {name!r} is for {lora.kind} models; {offer.id} is "
                f"{offer.lora_kind}."
            )
        if message or lora is None:
            if not any(p["message"] == message for p in problems):
                problems.append({"field": "loras", "message": message})
            continue
        found.append(LoraSpec(name=name, weight=weight, sha256=lora.sha256))
    return prompt, found


def request_sources(
    body: schemas.GenerationRequest, files: Mapping[str, bytes] | None = None
) -> dict[InputRole, Source]:
    """The inputs a request names, from its JSON fields or its file parts."""
    sources: dict[InputRole, Source] = {}
    for role in InputRole:
        value = getattr(body, role.value)
        if files and role.value in files:
            if value is not None:
                raise field_error(role.value, "Send it as a file or a field, not both.")
            sources[role] = files[role.value]
        elif isinstance(value, schemas.ImageReference):
            sources[role] = ResultRef(value.generation_id, value.index)
        elif value is not None:
            sources[role] = value
    if InputRole.INIT_IMAGE not in sources:
        if InputRole.MASK in sources:
            raise field_error("mask", "A mask needs an init_image to repaint.")
        if body.strength is not None:
            raise field_error("strength", "strength needs an init_image.")
    return sources

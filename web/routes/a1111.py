"""`/sdapi/v1/...`: the AUTOMATIC1111 web UI API, for the tools that speak it.

txt2img and img2img become ordinary premium generations and are answered
once done, as A1111 answers (web.waiting bounds the wait); progress and
interrupt concern the caller's own work only; options set the caller's own
default model. A1111 clients authenticate with `--api-auth`, HTTP Basic:
the password is an sdapi API token. Errors use A1111's shapes (web.errors).
"""

from __future__ import annotations

import base64
import binascii
from functools import partial
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from sdapi.contract.status import Status, Tier
from sdapi.db.models import Generation, InputRole, User
from sdapi.infra.registry import ModelOffer
from web.a1111_progress import running_progress
from web.a1111_requests import (
    a1111_error,
    checkpoint_model,
    edited_mask,
    generation_request,
    info,
    option_problems,
    parameters,
    unsupported,
)
from web.a1111_samplers import offered, scheduler_for
from web.appkeys import (
    decoders_key,
    redis_deadline_key,
    registry_key,
    settings_key,
)
from web.auth import Principal, authenticate, bearer_secret
from web.errors import (
    PremiumRequired,
    Unauthorized,
    ValidationFailed,
)
from web.generation_views import read_pngs, stored_images
from web.generations import (
    cancel_generation,
    prepare_inputs,
    require_verified,
    submit_generation,
)
from web.openapi import ApiRoutes, Response, json_response, read_body
from web.request_resolution import find_offer
from web.schemas import a1111 as schemas
from web.schemas.a1111 import CHECKPOINT_OPTION, FIXED_OPTIONS
from web.schemas.generations import ResolvedRequest
from web.token_cache import announce_user_changed
from web.uploads import CleanImage
from web.waiting import wait_for_generation

routes = ApiRoutes(tags=["automatic1111"], security=("basic", "bearer"))

_BASIC = 'Basic realm="sdapi", charset="UTF-8"'


def _basic_password(request: web.Request) -> str | None:
    """The password of an HTTP Basic Authorization header (the username is
    not looked at: the token alone says who is calling)."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, colon, password = decoded.partition(":")
    if not colon or not password.strip():
        return None
    return password.strip()


def _unauthorized(message: str) -> Unauthorized:
    error = Unauthorized(message)
    # A1111 clients answer a Basic challenge with their --api-auth.
    error.headers["WWW-Authenticate"] = _BASIC
    return error


async def _premium_caller(request: web.Request) -> Principal:
    """The caller, from a bearer token or HTTP Basic with a token as the
    password (never the session cookie), if premium and verified."""
    secret = bearer_secret(request) or _basic_password(request)
    if secret is None:
        raise _unauthorized(
            "Send an sdapi API token as the password of HTTP Basic auth "
            "(--api-auth) or as `Authorization: Bearer <token>`."
        )
    try:
        principal = await authenticate(request, token=secret)
    except Unauthorized as exc:
        raise _unauthorized(exc.message) from None
    if principal is None:
        raise _unauthorized("The token is invalid, expired or revoked.")
    if principal.tier is not Tier.PREMIUM:
        raise PremiumRequired(
            "The AUTOMATIC1111-compatible API answers synchronously and needs a "
            "premium account."
        )
    require_verified(principal)
    return principal


def _errors(*extra: Response) -> list[Response]:
    """The error answers every /sdapi/ route documents, in A1111's shapes."""
    return [
        Response(400, "Malformed request", schemas.A1111Error),
        Response(401, "Missing or invalid token", schemas.A1111Error),
        Response(403, "Not a premium or verified account", schemas.A1111Error),
        Response(404, "Nothing here", schemas.A1111Error),
        Response(405, "Method not allowed", schemas.A1111Error),
        Response(413, "Body too large", schemas.A1111Error),
        Response(422, "Invalid fields", schemas.A1111ValidationError),
        Response(429, "Too many requests", schemas.A1111Error),
        Response(503, "Unavailable; retry after Retry-After", schemas.A1111Error),
        *extra,
    ]


_GENERATION_ERRORS = (
    Response(410, "Interrupted before it finished", schemas.A1111Error),
    Response(502, "The generation failed", schemas.A1111Error),
    Response(504, "Not finished in time (then cancelled)", schemas.A1111Error),
)


async def _offers(request: web.Request) -> dict[str, ModelOffer]:
    deadline = request[redis_deadline_key]
    return await deadline.run(request.app[registry_key].offers())


async def _chosen_offer(
    request: web.Request, user: User, body: schemas.Txt2ImgRequest
) -> ModelOffer:
    """override_settings.sd_model_checkpoint's model, else the caller's default."""
    wanted = body.override_settings.get(CHECKPOINT_OPTION)
    model = None
    if wanted is not None:
        if not isinstance(wanted, str):
            raise ValidationFailed(
                details=[
                    {
                        "field": f"override_settings.{CHECKPOINT_OPTION}",
                        "message": "A model title (GET /sdapi/v1/sd-models).",
                    }
                ]
            )
        model = checkpoint_model(wanted, await _offers(request))
    return await find_offer(
        request.app,
        model,
        deadline=request[redis_deadline_key],
        own_default=user.default_model,
    )


async def _generate(
    request: web.Request,
    principal: Principal,
    body: schemas.Txt2ImgRequest,
) -> web.StreamResponse:
    """Submit, wait, and answer in A1111's shape."""
    app = request.app
    deadline = request[redis_deadline_key]
    offer = await _chosen_offer(request, principal.user, body)
    scheduler = scheduler_for(
        body.sampler_name or body.sampler_index, body.scheduler, offer.schedulers
    )
    problems = unsupported(body, scheduler)
    if problems:
        raise ValidationFailed(details=problems)
    img2img = isinstance(body, schemas.Img2ImgRequest)
    strength = body.denoising_strength if img2img else None
    try:
        generation_req = generation_request(body, offer, scheduler, strength=strength)
        inputs = await _inputs(app, principal, body, generation_req.num_images)
        generation = await submit_generation(
            app, principal, generation_req, inputs, deadline=deadline
        )
    except ValidationFailed as exc:
        raise a1111_error(exc) from None
    await wait_for_generation(request, generation, app[settings_key].a1111_timeout)
    images = (await stored_images([generation.id])).get(generation.id, [])
    pngs = await read_pngs(app, images) if body.send_images else []
    await generation.refresh_from_db(fields=["started_at"])
    resolved = ResolvedRequest.model_validate(generation.request)
    answer = schemas.TextToImageResponse(
        images=[base64.b64encode(png).decode() for png in pngs],
        parameters=parameters(body),
        info=info(
            body,
            resolved,
            [image.seed for image in images],
            generation_id=str(generation.id),
            started_at=generation.started_at,
        ),
    )
    response = json_response(answer)
    ignored = sorted(body.model_extra or {})
    if ignored:
        response.headers[schemas.IGNORED_FIELDS_HEADER] = ", ".join(ignored)
    return response


async def _inputs(
    app: web.Application,
    principal: Principal,
    body: schemas.Txt2ImgRequest,
    num_images: int,
) -> dict[InputRole, CleanImage]:
    """img2img's image and mask, checked and cleaned; the mask inverted and
    blurred as A1111 would."""
    if not isinstance(body, schemas.Img2ImgRequest):
        return {}
    sources: dict[InputRole, Any] = {InputRole.INIT_IMAGE: body.init_images[0]}
    if body.mask is not None:
        sources[InputRole.MASK] = body.mask
    inputs = await prepare_inputs(app, principal, sources, num_images=num_images)
    mask = inputs.get(InputRole.MASK)
    if mask is not None:
        blur = body.mask_blur
        blur_x = body.mask_blur_x if blur is None else blur
        blur_y = body.mask_blur_y if blur is None else blur
        invert = body.inpainting_mask_invert == 1
        if blur_x or blur_y or invert:
            inputs[InputRole.MASK] = await app[decoders_key].run(
                principal.user.id,
                partial(edited_mask, mask.data, blur_x, blur_y, invert),
            )
    return inputs


@routes.route(
    "POST",
    "/sdapi/v1/txt2img",
    summary="Text to image (AUTOMATIC1111 API compatible)",
    auth=_premium_caller,
    responses=[
        Response(
            200, "The images, the request and the seeds", schemas.TextToImageResponse
        ),
        *_errors(*_GENERATION_ERRORS),
    ],
)
async def txt2img(
    request: web.Request, *, principal: Principal, body: schemas.Txt2ImgRequest
) -> web.StreamResponse:
    """A1111's txt2img: batch_size x n_iter images in one generation, image i
    with seed + i; waits for the images. Premium only."""
    return await _generate(request, principal, body)


async def _read_img2img(
    request: web.Request, model: type[BaseModel]
) -> tuple[BaseModel, dict[str, bytes]]:
    # Images make bodies larger than the API's default limit, here only.
    roomy = request.clone(client_max_size=request.app[settings_key].upload_body_bytes)
    return await read_body(roomy, model), {}


@routes.route(
    "POST",
    "/sdapi/v1/img2img",
    summary="Image to image and inpainting (AUTOMATIC1111 API compatible)",
    auth=_premium_caller,
    reader=_read_img2img,
    responses=[
        Response(
            200, "The images, the request and the seeds", schemas.TextToImageResponse
        ),
        *_errors(*_GENERATION_ERRORS),
    ],
)
async def img2img(
    request: web.Request, *, principal: Principal, body: schemas.Img2ImgRequest
) -> web.StreamResponse:
    """A1111's img2img: `init_images` (one), `denoising_strength`, and for
    inpainting a `mask` (white = repaint; blurred by mask_blur, inverted with
    inpainting_mask_invert). Premium only; waits for the images."""
    return await _generate(request, principal, body)


@routes.route(
    "GET",
    "/sdapi/v1/progress",
    summary="Your running generation's progress (AUTOMATIC1111 API compatible)",
    auth=_premium_caller,
    responses=[Response(200, "Progress", schemas.ProgressResponse), *_errors()],
)
async def progress(
    request: web.Request, *, principal: Principal, query: schemas.ProgressQuery
) -> web.StreamResponse:
    """Your own work only: the running generation's `progress` (0..1),
    `eta_relative` (its running time left, as `eta_s` estimates it), its
    latest step preview; `job_count` counts your generations queued or running."""
    active = await Generation.filter(
        user_id=principal.user.id, status__in=[Status.QUEUED, Status.RUNNING]
    ).order_by("started_at", "created_at")
    running = next((g for g in active if g.status == Status.RUNNING), None)
    state = schemas.ProgressState(
        job="",
        job_count=len(active),
        job_timestamp="0",
        sampling_step=0,
        sampling_steps=0,
    )
    if running is None:
        return json_response(
            schemas.ProgressResponse(
                progress=0.0, eta_relative=0.0, state=state, current_image=None
            )
        )
    now = await running_progress(request.app, running, request[redis_deadline_key])
    state.job = str(running.id)
    if running.started_at is not None:
        state.job_timestamp = running.started_at.strftime("%Y%m%d%H%M%S")
    state.sampling_step, state.sampling_steps = now.step, now.total
    return json_response(
        schemas.ProgressResponse(
            progress=min(1.0, now.step / now.total) if now.total else 0.0,
            eta_relative=now.eta_s,
            state=state,
            current_image=None if query.skip_current_image else now.preview,
        )
    )


@routes.route(
    "POST",
    "/sdapi/v1/interrupt",
    summary="Stop your running generations (AUTOMATIC1111 API compatible)",
    auth=_premium_caller,
    responses=[
        Response(200, "Interrupted (or nothing ran)", schemas.A1111Empty),
        *_errors(),
    ],
)
async def interrupt(
    request: web.Request, *, principal: Principal
) -> web.StreamResponse:
    """Cancels your generations that are running (never anyone else's); ones
    still queued stay queued, as A1111's interrupt stops the job sampling now.
    A txt2img or img2img waiting for one answers 410."""
    running = await Generation.filter(user_id=principal.user.id, status=Status.RUNNING)
    for generation in running:
        await cancel_generation(request.app, generation)
    return json_response(schemas.A1111Empty())


@routes.route(
    "GET",
    "/sdapi/v1/sd-models",
    summary="Models (AUTOMATIC1111 API compatible)",
    auth=_premium_caller,
    responses=[
        Response(200, "The models GPU nodes serve", schemas.SDModelList),
        *_errors(),
    ],
)
async def sd_models(request: web.Request) -> web.StreamResponse:
    """The models of GET /api/v1/models as A1111 lists checkpoints; a title
    works as override_settings.sd_model_checkpoint and in options."""
    offers = await _offers(request)
    return json_response(
        schemas.SDModelList(
            [
                schemas.SDModelItem(
                    title=name, model_name=name, hash=None, sha256=None, filename=name
                )
                for name in sorted(offers)
            ]
        )
    )


@routes.route(
    "GET",
    "/sdapi/v1/samplers",
    summary="Samplers (AUTOMATIC1111 API compatible)",
    auth=_premium_caller,
    responses=[Response(200, "Samplers", schemas.SamplerList), *_errors()],
)
async def samplers(request: web.Request) -> web.StreamResponse:
    """A1111's sampler names that some served model's nodes can run."""
    schedulers = {
        s for offer in (await _offers(request)).values() for s in offer.schedulers
    }
    return json_response(
        schemas.SamplerList(
            [
                schemas.SamplerItem(
                    name=sampler.name,
                    aliases=list(sampler.aliases),
                    options=sampler.options,
                )
                for sampler in offered(schedulers)
            ]
        )
    )


@routes.route(
    "GET",
    "/sdapi/v1/loras",
    summary="LoRAs (AUTOMATIC1111 API compatible)",
    auth=_premium_caller,
    responses=[Response(200, "LoRAs", schemas.LoraList), *_errors()],
)
async def loras(request: web.Request) -> web.StreamResponse:
    """The LoRAs the models' nodes have; use them as <lora:name:weight> in the
    prompt."""
    found: dict[str, schemas.LoraItem] = {}
    for offer in (await _offers(request)).values():
        for lora in offer.loras:
            found.setdefault(
                lora.name,
                schemas.LoraItem(
                    name=lora.name,
                    alias=lora.name,
                    path=lora.name,
                    metadata={
                        "kind": lora.kind,
                        "trigger_words": lora.trigger_words,
                        "sha256": lora.sha256,
                    },
                ),
            )
    return json_response(schemas.LoraList([found[name] for name in sorted(found)]))


@routes.route(
    "GET",
    "/sdapi/v1/options",
    summary="A1111Options (AUTOMATIC1111 API compatible)",
    auth=_premium_caller,
    responses=[Response(200, "Your options", schemas.A1111Options), *_errors()],
)
async def get_options(
    request: web.Request, *, principal: Principal
) -> web.StreamResponse:
    """`sd_model_checkpoint`: your default model (the service's until you set
    one); the other options describe what this service does."""
    offer = await find_offer(
        request.app,
        None,
        deadline=request[redis_deadline_key],
        own_default=principal.user.default_model,
    )
    return json_response(
        schemas.A1111Options(sd_model_checkpoint=offer.id, **FIXED_OPTIONS)
    )


@routes.route(
    "POST",
    "/sdapi/v1/options",
    summary="Set your default model (AUTOMATIC1111 API compatible)",
    auth=_premium_caller,
    responses=[Response(200, "Saved", schemas.A1111Empty), *_errors()],
)
async def set_options(
    request: web.Request, *, principal: Principal, body: schemas.A1111OptionsUpdate
) -> web.StreamResponse:
    """`sd_model_checkpoint` sets your own default model, used by every request
    of yours that names none (here and on /api/v1); never anyone else's. Any
    other option only at the value GET shows."""
    problems = option_problems(body.model_extra or {})
    if problems:
        raise ValidationFailed(details=problems)
    if body.sd_model_checkpoint is not None:
        model = checkpoint_model(body.sd_model_checkpoint, await _offers(request))
        await User.filter(id=principal.user.id).update(default_model=model)
        await announce_user_changed(request.app, principal.user.id)
    return json_response(schemas.A1111Empty())

"""`POST /v1/images/generations` and `/v1/images/edits`: the OpenAI Images API,
answered synchronously.

The request becomes an ordinary premium generation; the handler follows its
event stream until `done` (bounded by SDAPI_OPENAI_TIMEOUT, after which the
generation is cancelled) and answers in OpenAI's shapes, so OpenAI clients
pointed at `<base url>/v1` work unchanged. Errors on this path use OpenAI's
error shape (web.errors).
"""

from __future__ import annotations

import base64
from functools import partial
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from sdapi.contract.status import Tier
from sdapi.db.models import Generation, InputRole
from sdapi.infra.deadline import Deadline
from sdapi.infra.links import signed_image_url
from web.appkeys import decoders_key, redis_deadline_key, settings_key, stores_key
from web.auth import Principal, authenticate, bearer_secret
from web.errors import (
    PremiumRequired,
    Unauthorized,
    ValidationFailed,
    validation_details,
)
from web.forms import read_form
from web.generation_views import read_pngs, stored_images
from web.generations import (
    check_allowance,
    require_verified,
    submit_generation,
)
from web.idempotency import IdempotencyClaim, claim_from, file_digest
from web.inputs import check_mask_size, resolve_input
from web.openapi import ApiRoutes, Response, json_response
from web.request_resolution import find_offer
from web.schemas.generations import GenerationRequest
from web.schemas.openai import (
    AUTO_SIZE,
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    OpenAIErrorBody,
)
from web.uploads import CleanImage, Use, flatten, has_transparency
from web.waiting import wait_for_generation

routes = ApiRoutes(tags=["openai"])

# Our field names as the OpenAI request calls them, for error `param`s.
_OPENAI_FIELDS = {"width": "size", "height": "size", "num_images": "n"}


def _openai_error(error: ValidationFailed) -> ValidationFailed:
    """The same error with fields named as in the OpenAI request."""
    details = [
        {**detail, "field": _OPENAI_FIELDS.get(detail["field"], detail["field"])}
        for detail in error.details
    ]
    return ValidationFailed(error.message, details=details)


async def _premium_bearer(request: web.Request) -> Principal:
    """The caller, from a bearer token only (OpenAI clients send one), if premium."""
    if bearer_secret(request) is None:
        raise Unauthorized("Send your sdapi token as `Authorization: Bearer <token>`.")
    principal = await authenticate(request)
    if principal is None:
        raise Unauthorized()
    if principal.tier is not Tier.PREMIUM:
        raise PremiumRequired(
            "The OpenAI-compatible endpoint answers synchronously and needs a "
            "premium account."
        )
    # Before the body is read: nothing of an unverified account's is decoded.
    require_verified(principal)
    return principal


async def _generation_request(
    app: web.Application,
    body: ImageGenerationRequest | ImageEditRequest,
    *,
    deadline: Deadline,
    own_default: str | None = None,
    **extra: Any,
) -> GenerationRequest:
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "model": body.model,
        "num_images": body.n or 1,
        "delivery": "download",
        **extra,
    }
    if body.size is None or body.size == AUTO_SIZE:
        if isinstance(body, ImageGenerationRequest):
            # As OpenAI's "auto": the size the model is made for.
            offer = await find_offer(
                app, body.model, deadline=deadline, own_default=own_default
            )
            fields.update(width=offer.default_width, height=offer.default_height)
        # An edit without a size keeps its image's (scaled to fit).
    else:
        width, _, height = body.size.partition("x")
        fields.update(width=int(width), height=int(height))
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as exc:
        raise _openai_error(ValidationFailed(details=validation_details(exc))) from None


@routes.route(
    "POST",
    "/v1/images/generations",
    summary="Create images (OpenAI Images API compatible)",
    auth=_premium_bearer,
    idempotent=True,
    responses=[
        Response(200, "The images", ImagesResponse),
        Response(400, "Invalid parameters", OpenAIErrorBody),
        Response(401, "Missing or invalid bearer token", OpenAIErrorBody),
        Response(403, "Not a premium account", OpenAIErrorBody),
        Response(410, "Cancelled before it finished", OpenAIErrorBody),
        Response(429, "Too many requests in flight or quota spent", OpenAIErrorBody),
        Response(502, "The generation failed", OpenAIErrorBody),
        Response(503, "The GPU nodes cannot be listed right now", OpenAIErrorBody),
        Response(504, "Not finished in time (then cancelled)", OpenAIErrorBody),
    ],
)
async def create_images(
    request: web.Request, *, principal: Principal, body: ImageGenerationRequest
) -> web.StreamResponse:
    """Point an OpenAI client at `<base url>/v1` with an sdapi token as the API
    key. Premium only; waits for the images. `size` "WxH" or "auto" (the
    model's default), `n` images, `response_format` `url` (signed links valid
    for an hour) or `b64_json`. Errors use OpenAI's shape, invalid parameters
    are 400."""
    app = request.app
    claim = claim_from(
        request.headers, "openai.generations", body.model_dump(mode="json")
    )
    deadline = request[redis_deadline_key]
    try:
        generation_request = await _generation_request(
            app, body, deadline=deadline, own_default=principal.user.default_model
        )
        generation = await submit_generation(
            app, principal, generation_request, deadline=deadline, idempotency=claim
        )
    except ValidationFailed as exc:
        raise _openai_error(exc) from None
    await wait_for_generation(request, generation, app[settings_key].openai_timeout)
    return await _images_response(app, generation, body.response_format)


async def _images_response(
    app: web.Application, generation: Generation, response_format: str | None
) -> web.Response:
    """A finished generation's images in OpenAI's response shape."""
    settings = app[settings_key]
    images = (await stored_images([generation.id])).get(generation.id, [])
    if response_format == "b64_json":
        pngs = await read_pngs(app, images)
        data = [ImageData(b64_json=base64.b64encode(png).decode()) for png in pngs]
    else:
        data = [
            ImageData(
                url=signed_image_url(
                    settings.secret(),
                    settings.base_url,
                    generation.id,
                    image.index,
                    ttl_s=settings.openai_url_ttl,
                )
            )
            for image in images
        ]
    return json_response(
        ImagesResponse(created=int(generation.created_at.timestamp()), data=data)
    )


_EDIT_FILES = frozenset({"image", "image[]", "mask"})


async def _edit_inputs(
    app: web.Application,
    principal: Principal,
    body: ImageEditRequest,
    claim: IdempotencyClaim | None,
) -> dict[InputRole, CleanImage]:
    """The image to edit and the mask (white = repaint) from OpenAI's inputs,
    decoded only if the quota and in-flight limits let the request through."""
    limits = app[settings_key].limits(Tier.PREMIUM)
    await check_allowance(principal, limits, body.n or 1, claim)
    user = principal.user
    decoders = app[decoders_key]
    image = await resolve_input(
        user,
        body.image,
        field="image",
        use=Use.IMAGE,
        limits=limits,
        decoders=decoders,
        stores=app[stores_key],
        keep_alpha=True,
    )
    mask: CleanImage | None = None
    if body.mask is not None:
        mask = await resolve_input(
            user,
            body.mask,
            field="mask",
            use=Use.ALPHA_MASK,
            limits=limits,
            decoders=decoders,
            stores=app[stores_key],
        )
    elif await decoders.run(user.id, partial(has_transparency, image)):
        # No mask: as OpenAI does, the image's own transparency is the mask.
        mask = await resolve_input(
            user,
            image.data,
            field="image",
            use=Use.ALPHA_MASK,
            limits=limits,
            decoders=decoders,
            stores=app[stores_key],
        )
    # Decoding and encoding again: CPU work of the same kind, in the same share.
    init = await decoders.run(user.id, partial(flatten, image))
    inputs = {InputRole.INIT_IMAGE: init}
    if mask is not None:
        check_mask_size(init, mask)
        inputs[InputRole.MASK] = mask
    return inputs


async def _read_edit(
    request: web.Request, model: type[BaseModel]
) -> tuple[BaseModel, dict[str, bytes]]:
    """An edit's form: its fields and files as `model`, and the files."""
    settings = request.app[settings_key]
    # Images make bodies larger than the API's default limit, here only.
    roomy = request.clone(client_max_size=settings.upload_body_bytes)
    form = await read_form(
        roomy,
        file_fields=_EDIT_FILES,
        max_file_bytes=settings.premium_max_upload_bytes,
    )
    files = dict(form.files)
    if "image[]" in files:
        # The SDK names the part `image[]` when given a list (of one, here).
        if "image" in files:
            raise _openai_error(
                ValidationFailed(
                    details=[{"field": "image", "message": "Send one image."}]
                )
            )
        files["image"] = files.pop("image[]")
    try:
        body = model.model_validate({**form.fields, **files})
    except ValidationError as exc:
        raise _openai_error(ValidationFailed(details=validation_details(exc))) from None
    return body, files


@routes.route(
    "POST",
    "/v1/images/edits",
    summary="Edit an image (OpenAI Images API compatible)",
    auth=_premium_bearer,
    body_types=("multipart/form-data",),
    reader=_read_edit,
    idempotent=True,
    responses=[
        Response(200, "The images", ImagesResponse),
        Response(400, "Invalid parameters or image", OpenAIErrorBody),
        Response(401, "Missing or invalid bearer token", OpenAIErrorBody),
        Response(403, "Not a premium account", OpenAIErrorBody),
        Response(410, "Cancelled before it finished", OpenAIErrorBody),
        Response(413, "An image is too large", OpenAIErrorBody),
        Response(429, "Too many requests in flight or quota spent", OpenAIErrorBody),
        Response(502, "The generation failed", OpenAIErrorBody),
        Response(503, "No GPU node serves the model", OpenAIErrorBody),
        Response(504, "Not finished in time (then cancelled)", OpenAIErrorBody),
    ],
)
async def edit_images(
    request: web.Request,
    *,
    principal: Principal,
    body: ImageEditRequest,
    files: dict[str, bytes],
) -> web.StreamResponse:
    """Inpainting as OpenAI's `images.edit` does it: multipart form data with
    `image`, an optional `mask` whose fully transparent pixels mark the area
    to repaint (without one, the image's own transparency does), `prompt`,
    `n`, `size` and `response_format`. Premium only; waits for the images."""
    app = request.app
    claim = claim_from(
        request.headers,
        "openai.edits",
        {
            "fields": body.model_dump(mode="json", exclude={"image", "mask"}),
            "files": {name: file_digest(data) for name, data in sorted(files.items())},
        },
    )
    deadline = request[redis_deadline_key]
    try:
        inputs = await _edit_inputs(app, principal, body, claim)
        # Inpainting repaints the masked area from noise, as OpenAI does.
        strength = 1.0 if InputRole.MASK in inputs else None
        generation_request = await _generation_request(
            app, body, deadline=deadline, strength=strength
        )
        generation = await submit_generation(
            app,
            principal,
            generation_request,
            inputs,
            deadline=deadline,
            idempotency=claim,
        )
    except ValidationFailed as exc:
        raise _openai_error(exc) from None
    await wait_for_generation(request, generation, app[settings_key].openai_timeout)
    return await _images_response(app, generation, body.response_format)

"""REST endpoints of generations: submit, list, show, download, cancel."""

from __future__ import annotations

import json
import uuid

from aiohttp import web
from pydantic import BaseModel, ValidationError

from sdapi.db.models import Generation
from sdapi.infra.links import image_path, link_is_valid
from web.appkeys import redis_deadline_key, redis_key, settings_key
from web.auth import Principal
from web.downloads import send_image
from web.errors import Conflict, NotFound, Unauthorized, from_validation_error
from web.forms import is_form, read_form
from web.generation_views import (
    image_headers,
    list_own,
    node_copy,
    present,
    stored_image,
    stored_images,
)
from web.generations import (
    cancel_generation,
    delete_finished,
    load_own,
    prepare_inputs,
    submit_and_place,
)
from web.idempotency import claim_from, file_digest
from web.openapi import (
    ApiRoutes,
    ErrorBody,
    Response,
    json_response,
    read_body,
)
from web.request_resolution import request_sources
from web.schemas import generations as schemas

routes = ApiRoutes(tags=["generations"])


_FILE_FIELDS = frozenset({"init_image", "mask"})


# Fields whose object form comes as JSON text in a form.
_JSON_FIELDS = _FILE_FIELDS | {"webhook"}


def _form_value(name: str, text: str) -> object:
    # A result reference or a webhook comes as JSON text; everything else
    # pydantic converts.
    if name in _JSON_FIELDS and text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


async def _read_submission(
    request: web.Request, model: type[BaseModel]
) -> tuple[BaseModel, dict[str, bytes]]:
    """The request and its uploaded files, from JSON or multipart form data."""
    settings = request.app[settings_key]
    # Images make bodies larger than the API's default limit, here only.
    roomy = request.clone(client_max_size=settings.upload_body_bytes)
    if not is_form(roomy):
        return await read_body(roomy, model), {}
    form = await read_form(
        roomy,
        file_fields=_FILE_FIELDS,
        max_file_bytes=settings.premium_max_upload_bytes,
    )
    fields = {
        name: _form_value(name, text) for name, text in form.fields.items() if text
    }
    try:
        body = model.model_validate(fields)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    return body, form.files


@routes.route(
    "POST",
    "/api/v1/generations",
    summary="Ask for images",
    body_types=("application/json", "multipart/form-data"),
    reader=_read_submission,
    idempotent=True,
    responses=[Response(202, "Accepted", schemas.GenerationView)],
)
async def create_generation(
    request: web.Request,
    *,
    principal: Principal,
    body: schemas.GenerationRequest,
    files: dict[str, bytes],
) -> web.StreamResponse:
    """Premium: queued at once and run as soon as a GPU is free. Normal: stored
    as `scheduled`, run later in a batch, and emailed. The body may also be
    multipart form data, with `init_image` and `mask` as file parts. With an
    `Idempotency-Key` header, a retry of the same request within 24 h answers
    with the first generation; another request with that key is a 409."""
    claim = claim_from(
        request.headers,
        "generations",
        {
            "body": body.model_dump(mode="json"),
            "files": {name: file_digest(data) for name, data in files.items()},
        },
    )
    sources = request_sources(body, files)
    inputs = await prepare_inputs(
        request.app, principal, sources, num_images=body.num_images, idempotency=claim
    )
    deadline = request[redis_deadline_key]
    generation, placed = await submit_and_place(
        request.app, principal, body, inputs, deadline=deadline, idempotency=claim
    )
    view = await present(
        request.app, generation, images=[], deadline=deadline, live=placed
    )
    response = json_response(view, status=202)
    response.headers["Location"] = f"/api/v1/generations/{generation.id}"
    return response


@routes.route(
    "GET",
    "/api/v1/generations",
    summary="Your generations, newest first",
    responses=[Response(200, "A page of generations", schemas.GenerationList)],
)
async def list_generations(
    request: web.Request, *, principal: Principal, query: schemas.ListQuery
) -> web.StreamResponse:
    """Cursor pagination: pass `next` back as `before`."""
    rows, cursor = await list_own(principal.user, query.limit, query.before)
    images = await stored_images(row.id for row in rows)
    # One Redis budget for the page: once spent, the rest answer from
    # PostgreSQL alone (no queue position or progress).
    deadline = request[redis_deadline_key]
    items = [
        await present(request.app, row, images.get(row.id, []), deadline=deadline)
        for row in rows
    ]
    return json_response(schemas.GenerationList(items=items, next=cursor))


@routes.route(
    "GET",
    "/api/v1/generations/{id}",
    summary="One generation: status, queue position, progress, images",
    responses=[Response(200, "The generation", schemas.GenerationView)],
)
async def get_generation(
    request: web.Request, *, principal: Principal
) -> web.StreamResponse:
    """Other users' generations are 404, as if they did not exist."""
    generation = await load_own(principal.user, request.match_info["id"])
    view = await present(request.app, generation, deadline=request[redis_deadline_key])
    return json_response(view)


# The most images a generation can have is far below this; a larger index is
# a 404 before it reaches the database (whose integer it would overflow).
MAX_IMAGE_INDEX = 9999


def _image_index(request: web.Request) -> int:
    text = request.match_info["index"]
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_IMAGE_INDEX:
        raise NotFound("No such image.")
    return int(text)


async def _download_generation(
    request: web.Request,
    index: int,
    query: schemas.ImageQuery,
    principal: Principal | None,
) -> Generation:
    """The generation named in the path, for its owner or a signed link."""
    generation_id = request.match_info["id"]
    if query.signature is not None and query.expires is not None:
        secret = request.app[settings_key].secret()
        path = image_path(generation_id, index)
        if not link_is_valid(secret, path, query.expires, query.signature):
            raise Unauthorized("The download link is invalid or has expired.")
        try:
            found = await Generation.get_or_none(id=uuid.UUID(generation_id))
        except ValueError:
            found = None
        if found is None:
            raise NotFound("No such generation.")
        return found
    if principal is None:
        raise Unauthorized()
    return await load_own(principal.user, generation_id)


@routes.route(
    "GET",
    "/api/v1/generations/{id}/images/{index}",
    summary="Download one image (PNG with its parameters in text chunks)",
    auth="optional",
    responses=[
        Response(200, "The PNG", content_type="image/png"),
        Response(
            302,
            "With SDAPI_STORAGE_REDIRECT=true and an S3 store: to a presigned "
            "URL of the PNG (Location), valid SDAPI_STORAGE_PRESIGN_S seconds",
        ),
        Response(304, "Not modified (If-None-Match matched the ETag)"),
        Response(410, "The image store no longer has this image", ErrorBody),
    ],
)
async def download_image(
    request: web.Request,
    *,
    principal: Principal | None,
    query: schemas.ImageQuery,
) -> web.StreamResponse:
    """Needs the owner's credentials, or the signed link from the result email.
    A stored image carries an ETag; `If-None-Match` with it answers 304."""
    index = _image_index(request)
    generation = await _download_generation(request, index, query, principal)
    stored = await stored_image(generation.id, index)
    if stored is not None and request.headers.get("If-None-Match") == (
        f'"{stored.sha256}"'
    ):
        return web.Response(status=304, headers=image_headers(stored))
    if stored is not None:
        return await send_image(request, stored)
    data = await node_copy(request.app[redis_key], generation.id, index)
    if data is None:
        raise NotFound("No such image (yet).")
    # The node's copy, before `jobs` stored it: not final, not cached.
    headers = {"Content-Type": "image/png", "Cache-Control": "no-store"}
    return web.Response(body=data, headers=headers)


@routes.route(
    "DELETE",
    "/api/v1/generations/{id}",
    summary="Cancel a generation, or delete a finished one (`purge=true`)",
    responses=[
        Response(204, "Cancelled (or already finished); with purge, deleted"),
        Response(404, "No such generation of yours", ErrorBody),
        Response(409, "purge=true on a generation that has not finished", ErrorBody),
    ],
)
async def delete_generation(
    request: web.Request, *, principal: Principal, query: schemas.DeleteQuery
) -> web.StreamResponse:
    """Scheduled work leaves its window; queued or running work stops within a
    step; finished work is left as it is. With `purge=true` a finished
    generation is deleted with its images (cancel unfinished work first)."""
    generation = await load_own(principal.user, request.match_info["id"])
    if not query.purge:
        await cancel_generation(request.app, generation)
    elif not await delete_finished(generation):
        raise Conflict("It has not finished: cancel it first, then delete it.")
    return web.Response(status=204)

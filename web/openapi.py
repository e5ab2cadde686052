"""Route tables that know their pydantic models, and the OpenAPI 3.1 built from them.

Each routes module declares its endpoints once, with the models of the body,
query and responses; the app registers them and `/openapi.json` is generated
from the same declarations, so the document cannot drift from the code.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from web.errors import BadRequest, PayloadTooLarge, from_validation_error

HandlerFn = Callable[[web.Request], Awaitable[web.StreamResponse]]
ModelT = TypeVar("ModelT", bound=BaseModel)


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx answer."""

    class Detail(BaseModel):
        field: str
        message: str

    class Error(BaseModel):
        code: str
        message: str
        details: list[ErrorBody.Detail] = []

    error: Error


@dataclass(frozen=True)
class Response:
    """One documented response of an endpoint."""

    status: int
    description: str
    model: type[BaseModel] | None = None
    content_type: str = "application/json"


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: HandlerFn
    summary: str
    tags: tuple[str, ...]
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    responses: tuple[Response, ...]
    auth: bool
    description: str = ""
    # Served but left out of the OpenAPI document (the docs page itself).
    hidden: bool = False
    # Media types the body may come in (the same fields in each).
    body_types: tuple[str, ...] = ("application/json",)
    # Takes an `Idempotency-Key` header (retries answer with the first result).
    idempotent: bool = False
    # Answers browsers (no `Accept: application/json`) with HTML pages.
    pages: bool = False


class ApiRoutes:
    """Like aiohttp's RouteTableDef, but every route carries its schema."""

    def __init__(self, *, tags: Sequence[str] = ()) -> None:
        self.tags = tuple(tags)
        self.endpoints: list[Endpoint] = []

    def route(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        responses: Sequence[Response],
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        auth: bool = True,
        description: str = "",
        tags: Sequence[str] = (),
        hidden: bool = False,
        body_types: Sequence[str] = ("application/json",),
        idempotent: bool = False,
        pages: bool = False,
    ) -> Callable[[HandlerFn], HandlerFn]:
        """Declare an endpoint; the decorated handler is returned unchanged."""

        def register(handler: HandlerFn) -> HandlerFn:
            self.endpoints.append(
                Endpoint(
                    method=method.upper(),
                    path=path,
                    handler=handler,
                    summary=summary,
                    tags=tuple(tags) or self.tags,
                    body=body,
                    query=query,
                    responses=tuple(responses),
                    auth=auth,
                    description=description or (handler.__doc__ or "").strip(),
                    hidden=hidden,
                    body_types=tuple(body_types),
                    idempotent=idempotent,
                    pages=pages,
                )
            )
            return handler

        return register

    def add_to(self, app: web.Application) -> None:
        """Register every endpoint on `app`."""
        for endpoint in self.endpoints:
            app.router.add_route(endpoint.method, endpoint.path, endpoint.handler)


async def _read_raw(request: web.Request) -> tuple[bytes, Any]:
    """The JSON body's bytes and its parsed value, or a contract error."""
    content_type = request.headers.get("Content-Type", "")
    if request.content_type != "application/json":
        shown = content_type or "none"
        raise BadRequest(f"Send the body as application/json (got {shown}).")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge() from None
    if not raw:
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        return raw, json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(f"The body is not valid JSON: {exc}.") from None
    except RecursionError:
        # A small body of deeply nested arrays exhausts the parser's stack.
        raise BadRequest("The body nests too deeply.") from None


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or a contract error (400 / 413)."""
    _, data = await _read_raw(request)
    return data


async def read_body(request: web.Request, model: type[ModelT]) -> ModelT:
    """The request body validated as `model` (422 with one detail per field).

    Strictly, as JSON: `"64"`, `64.0` and `true` are not integers, so what the
    published schema says is what is accepted.
    """
    raw, data = await _read_raw(request)
    if not isinstance(data, dict):
        raise BadRequest("The body must be a JSON object.")
    try:
        try:
            return model.model_validate_json(raw, strict=True)
        except ValidationError as exc:
            if any(error["type"] != "json_invalid" for error in exc.errors()):
                raise
            # JSON that Python reads but pydantic's parser refuses (a lone
            # surrogate escape, NaN): the fields say what is wrong with it.
            return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def read_query(request: web.Request, model: type[ModelT]) -> ModelT:
    """The query string validated as `model`."""
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def json_response(model: BaseModel, *, status: int = 200) -> web.Response:
    """A JSON response from a public model (never an ORM object)."""
    return web.Response(
        body=model.model_dump_json(),
        status=status,
        content_type="application/json",
    )


_ERROR_DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing, expired or revoked credentials",
    403: "Not allowed",
    404: "Not found (also other users' objects)",
    409: "Conflict",
    413: "Body too large",
    422: "Invalid fields",
    429: "Too many requests or quota spent",
    503: "Unavailable; retry after the Retry-After seconds",
}


_REF_PREFIX = "#/components/schemas/"


def _titled_names(defs: dict[str, Any]) -> dict[str, str]:
    """Schema names to replace by their model's explicit title.

    A pydantic schema class is named for what it is in the code (`UserView`,
    beside the ORM model `User`), but clients know it by its public name, the
    `title` it declares: generated clients keep the names they always had.
    """
    renames: dict[str, str] = {}
    for key, schema in defs.items():
        base, dash, side = key.partition("-")
        title = schema.get("title")
        if isinstance(title, str) and title != base:
            renames[key] = f"{title}{dash}{side}"
    clashes = set(renames.values()) & (set(defs) - set(renames))
    # Two models with one title (a subclass inherits it) would share a name.
    clashes |= {
        name for name in renames.values() if list(renames.values()).count(name) > 1
    }
    if clashes:
        raise ValueError(f"schema titles clash with schema names: {sorted(clashes)}")
    return renames


def _renamed(value: Any, renames: dict[str, str]) -> Any:
    """`value` with its `$ref`s to schemas renamed per `renames`."""
    if not renames:
        return value
    if isinstance(value, str):
        name = value.removeprefix(_REF_PREFIX)
        if value.startswith(_REF_PREFIX) and name in renames:
            return _REF_PREFIX + renames[name]
        return value
    if isinstance(value, list):
        return [_renamed(item, renames) for item in value]
    if isinstance(value, dict):
        return {key: _renamed(item, renames) for key, item in value.items()}
    return value


def build_openapi(
    routes: Iterable[ApiRoutes],
    *,
    title: str,
    version: str,
    description: str,
    server_url: str,
    extra_schemas: Sequence[type[BaseModel]] = (),
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`, schemas generated by pydantic."""
    endpoints = [
        endpoint
        for table in routes
        for endpoint in table.endpoints
        if not endpoint.hidden
    ]
    # Each model as its side of the wire sees it: request bodies in pydantic's
    # "validation" mode (what is accepted), responses in "serialization" mode
    # (what is sent). A model used both ways whose two schemas differ gets
    # both, named "-Input" and "-Output" by pydantic.
    inputs: set[type[BaseModel]] = set()
    outputs: set[type[BaseModel]] = {ErrorBody, *extra_schemas}
    for endpoint in endpoints:
        if endpoint.body is not None:
            inputs.add(endpoint.body)
        outputs.update(r.model for r in endpoint.responses if r.model is not None)
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        *((model, "validation") for model in sorted(inputs, key=_name)),
        *((model, "serialization") for model in sorted(outputs, key=_name)),
    ]
    keys, definitions = models_json_schema(
        wanted, ref_template="#/components/schemas/{model}"
    )
    renames = _titled_names(definitions.get("$defs", {}))
    schemas = {
        renames.get(name, name): _renamed(schema, renames)
        for name, schema in definitions.get("$defs", {}).items()
    }
    refs = {key: _renamed(value["$ref"], renames) for key, value in keys.items()}

    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        operation: dict[str, Any] = {
            "summary": endpoint.summary,
            "operationId": endpoint.handler.__name__,
            "tags": list(endpoint.tags),
            "responses": {},
        }
        if endpoint.description:
            operation["description"] = endpoint.description
        if endpoint.auth:
            operation["security"] = [{"bearer": []}, {"session": []}]
        parameters = _path_parameters(endpoint.path)
        if endpoint.query is not None:
            parameters += _query_parameters(endpoint.query)
        if endpoint.idempotent:
            parameters.append(_IDEMPOTENCY_PARAMETER)
        if parameters:
            operation["parameters"] = parameters
        if endpoint.body is not None:
            ref = refs[(endpoint.body, "validation")]
            operation["requestBody"] = {
                "required": True,
                "content": {
                    kind: {
                        "schema": _form_schema(schemas[ref.removeprefix(_REF_PREFIX)])
                        if kind == "multipart/form-data"
                        else {"$ref": ref}
                    }
                    for kind in endpoint.body_types
                },
            }
        for response in endpoint.responses:
            entry: dict[str, Any] = {"description": response.description}
            if response.model is not None:
                ref = refs[(response.model, "serialization")]
                entry["content"] = {response.content_type: {"schema": {"$ref": ref}}}
            elif response.status != 204 and response.content_type != "application/json":
                entry["content"] = {response.content_type: {"schema": _binary_schema()}}
            operation["responses"][str(response.status)] = entry
        for status, text in _ERROR_DESCRIPTIONS.items():
            operation["responses"].setdefault(
                str(status),
                {
                    "description": text,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": refs[(ErrorBody, "serialization")]}
                        }
                    },
                },
            )
        declared = {response.status for response in endpoint.responses}
        if not endpoint.auth and 401 not in declared:
            operation["responses"].pop("401", None)
        if endpoint.pages:
            for entry in operation["responses"].values():
                entry.get("content", {})["text/html"] = {"schema": {"type": "string"}}
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = operation

    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "sdapi_session"},
            },
        },
    }


def _name(model: type[BaseModel]) -> str:
    return model.__name__


def _binary_schema() -> dict[str, Any]:
    return {"type": "string", "contentMediaType": "image/png"}


_IDEMPOTENCY_PARAMETER: dict[str, Any] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    # Printable ASCII: what any HTTP client sends as is (web/idempotency.py).
    "schema": {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": "^[ -~]+$",
    },
    "description": "A retry with the same key and body within 24 h answers with "
    "the first request's result (charged once); the same key with another body "
    "is a 409.",
}


def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = [
        part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")
    ]
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in names
    ]


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    # The model's own schema carries each field's bounds, patterns and enums;
    # a query parameter is absent rather than null, so the null branch goes.
    properties = model.model_json_schema(mode="validation").get("properties", {})
    params = []
    for name, info in model.model_fields.items():
        wire_name = info.alias or name
        entry: dict[str, Any] = {
            "name": wire_name,
            "in": "query",
            "required": info.is_required(),
            "schema": _query_schema(properties[wire_name]),
        }
        if info.description:
            entry["description"] = info.description
        params.append(entry)
    return params


def _query_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A property's schema as a query parameter's: no title, no null."""
    return _not_null(
        {k: v for k, v in schema.items() if k not in {"title", "description"}}
    )


def _form_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A body's schema as multipart form data carries it.

    A form field is text or a file, never null: an optional field is left out.
    """
    properties = schema.get("properties", {})
    return {
        **schema,
        "properties": {name: _not_null(value) for name, value in properties.items()},
    }


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` without its null branch (and a null default)."""
    schema = dict(schema)
    if "default" in schema and schema["default"] is None:
        del schema["default"]
    branches = [b for b in schema.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        schema = {**branches[0], **schema}
    elif branches:
        schema["anyOf"] = branches
    return schema

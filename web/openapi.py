"""Route tables that know their pydantic models, and the OpenAPI 3.1 built from them.

Each routes module declares its endpoints once, with the models of the body,
query and responses; the app registers them and `/openapi.json` is generated
from the same declarations, so the document cannot drift from the code.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from web.auth import Principal, authenticate, require_user
from web.errors import (
    MALFORMED_BODY_ERRORS,
    AppError,
    BadRequest,
    PayloadTooLarge,
    from_validation_error,
    malformed_body,
    refuse_declared_oversize,
)

HandlerFn = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A handler as declared: the request, then by keyword what the route parsed
# for it (`principal`, `body`, `query`, `files`).
Handler = Callable[..., Awaitable[web.StreamResponse]]
ModelT = TypeVar("ModelT", bound=BaseModel)
# Finds the caller of a route that needs one, or raises 401/403 (None: a route
# that anyone may call finds no caller).
Authenticator = Callable[[web.Request], Awaitable[Principal | None]]
# Answers an error of a route its own way (a page for a browser), or None to
# leave it to the error middleware.
ErrorPage = Callable[[web.Request, AppError], Awaitable[web.StreamResponse | None]]
# Reads a body that may come as a form: the model and the uploaded files.
BodyReader = Callable[
    [web.Request, type[BaseModel]], Awaitable[tuple[BaseModel, dict[str, bytes]]]
]
# What a handler may ask the route for, by parameter name.
_INJECTED = frozenset({"principal", "body", "query", "files"})


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
    handler: Handler
    summary: str
    tags: tuple[str, ...]
    body: type[BaseModel] | None
    query: type[BaseModel] | None
    responses: tuple[Response, ...]
    # None: anyone may call it; else how the caller is found (401 without one).
    authenticator: Authenticator | None
    # Credentials are looked at but not needed (the handler decides).
    auth_optional: bool = False
    description: str = ""
    # Served but left out of the OpenAPI document (the docs page itself).
    hidden: bool = False
    # Media types the body may come in (the same fields in each).
    body_types: tuple[str, ...] = ("application/json",)
    # Takes an `Idempotency-Key` header (retries answer with the first result).
    idempotent: bool = False
    # Reads a body that is not plain JSON (a form with files); None: JSON.
    reader: BodyReader | None = None
    # The body may be left out (`body: Model | None`).
    body_optional: bool = False
    # The keyword arguments the handler takes.
    takes: frozenset[str] = frozenset()
    # Answers an error its own way (a page for a browser); None: the middleware.
    on_error: ErrorPage | None = None
    # Answers browsers (no `Accept: application/json`) with HTML pages.
    pages: bool = False

    @property
    def auth(self) -> bool:
        return self.authenticator is not None

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        """Authenticate, parse what the handler takes, then call it."""
        if self.on_error is None:
            return await self._call(request)
        try:
            return await self._call(request)
        except AppError as exc:
            page = await self.on_error(request, exc)
            if page is None:
                raise
            return page

    async def _call(self, request: web.Request) -> web.StreamResponse:
        kwargs: dict[str, Any] = {}
        if self.authenticator is not None:
            # Before the body: nothing of an anonymous caller's is parsed.
            principal = await self.authenticator(request)
            if "principal" in self.takes:
                kwargs["principal"] = principal
        if self.query is not None:
            kwargs["query"] = read_query(request, self.query)
        if self.body is not None:
            if self.body_optional and not request.can_read_body:
                kwargs["body"] = None
            elif self.reader is not None:
                kwargs["body"], files = await self.reader(request, self.body)
                if "files" in self.takes:
                    kwargs["files"] = files
            else:
                kwargs["body"] = await read_body(request, self.body)
        return await self.handler(request, **kwargs)


def _declared(handler: Handler) -> tuple[dict[str, Any], frozenset[str]]:
    """The models a handler's `body` and `query` parameters are annotated with,
    and the names of the parameters the route passes it."""
    names = [
        name for name in inspect.signature(handler).parameters if name != "request"
    ]
    unknown = set(names) - _INJECTED
    if unknown:
        raise TypeError(f"{handler.__qualname__}: no route parameter {unknown}")
    hints = typing.get_type_hints(handler)
    return {name: hints[name] for name in ("body", "query") if name in names}, (
        frozenset(names)
    )


def _model_of(annotation: Any) -> tuple[type[BaseModel], bool]:
    """The pydantic model of `Model` or `Model | None`, and whether None is allowed."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    optional = len(args) == 1 and len(typing.get_args(annotation)) == 2
    model = args[0] if optional else annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{annotation!r} is not a pydantic model")
    return model, optional


class ApiRoutes:
    """Like aiohttp's RouteTableDef, but every route carries its schema.

    A route is declared once: its handler's parameters say what it takes
    (`body: Model`, `query: Model`, `principal: Principal`, `files`) and the
    route parses, validates and authenticates before calling it, from the same
    declaration that the OpenAPI document is generated from.
    """

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
        auth: bool | Literal["optional"] | Authenticator = True,
        description: str = "",
        tags: Sequence[str] = (),
        hidden: bool = False,
        body_types: Sequence[str] = ("application/json",),
        reader: BodyReader | None = None,
        idempotent: bool = False,
        on_error: ErrorPage | None = None,
        pages: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Declare an endpoint; the decorated handler is returned unchanged.

        `auth`: True finds the caller with a token or the session cookie (401
        without one), "optional" passes the caller or None, False lets anyone
        call it, a function finds the caller its own way. `reader` reads a
        body that may come as a form; `on_error` may answer an error itself.
        """
        authenticator: Authenticator | None
        if auth is True:
            authenticator = require_user
        elif auth == "optional":
            authenticator = authenticate
        elif auth is False:
            authenticator = None
        else:
            authenticator = auth

        def register(handler: Handler) -> Handler:
            models, takes = _declared(handler)
            if "principal" in takes and authenticator is None:
                raise TypeError(f"{handler.__qualname__}: auth=False has no principal")
            if "files" in takes and reader is None:
                raise TypeError(f"{handler.__qualname__}: files need a reader")
            body, optional = (
                _model_of(models["body"]) if "body" in models else (None, False)
            )
            query = _model_of(models["query"])[0] if "query" in models else None
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
                    authenticator=authenticator,
                    description=description or (handler.__doc__ or "").strip(),
                    hidden=hidden,
                    body_types=tuple(body_types),
                    idempotent=idempotent,
                    reader=reader,
                    body_optional=optional,
                    takes=takes,
                    auth_optional=auth == "optional",
                    on_error=on_error,
                    pages=pages,
                )
            )
            return handler

        return register

    def add_to(self, app: web.Application) -> None:
        """Register every endpoint on `app`."""
        for endpoint in self.endpoints:
            app.router.add_route(endpoint.method, endpoint.path, _handler(endpoint))


def _handler(endpoint: Endpoint) -> HandlerFn:
    """`endpoint` as the plain coroutine function aiohttp takes for a handler."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await endpoint(request)

    handle.__name__ = handle.__qualname__ = endpoint.handler.__name__
    return handle


async def _read_raw(request: web.Request) -> tuple[bytes, Any]:
    """The JSON body's bytes and its parsed value, or a contract error."""
    content_type = request.headers.get("Content-Type", "")
    if request.content_type != "application/json":
        shown = content_type or "none"
        raise BadRequest(f"Send the body as application/json (got {shown}).")
    refuse_declared_oversize(request)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge() from None
    except MALFORMED_BODY_ERRORS:
        raise malformed_body() from None
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
    targets = list(renames.values())
    clashes = set(targets) & (set(defs) - set(renames))
    clashes |= {name for name in targets if targets.count(name) > 1}
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
            if endpoint.auth_optional:
                operation["security"].append({})
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
    A list of objects has no form encoding, so a form cannot carry it (LoRAs
    come as `<lora:name:weight>` tags in the prompt there): the field is left
    out of the form's schema, and the server refuses it in a form.
    """
    properties = {
        name: _not_null(value)
        for name, value in schema.get("properties", {}).items()
        if not _is_object_list(_not_null(value))
    }
    form = {**schema, "properties": properties}
    required = [name for name in schema.get("required", []) if name in properties]
    if required:
        form["required"] = required
    else:
        form.pop("required", None)
    return form


def _is_object_list(schema: dict[str, Any]) -> bool:
    items = schema.get("items", {}) if schema.get("type") == "array" else {}
    return "$ref" in items or items.get("type") == "object"


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

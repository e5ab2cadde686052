"""Route tables that know their pydantic models, and the body and query readers.

Each routes module declares its endpoints once, with the models of the body,
query and responses; the app registers them and `/openapi.json` is generated
from the same declarations (`web.openapi_document`), so the document cannot
drift from the code.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

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
    # The OpenAPI security schemes its callers may use (web.openapi_document).
    security: tuple[str, ...] = ("bearer", "session")

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

    def __init__(
        self,
        *,
        tags: Sequence[str] = (),
        security: Sequence[str] = ("bearer", "session"),
    ) -> None:
        self.tags = tuple(tags)
        self.security = tuple(security)
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
                    security=self.security,
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

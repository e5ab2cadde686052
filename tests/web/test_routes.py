"""Each route is declared once: the route authenticates and parses for it."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from web.app import create_app
from web.auth import Principal
from web.openapi import ApiRoutes, Response
from web.routes import route_tables
from web.schemas.tokens import TokenCreate
from web.settings import WebSettings


def _concrete(path: str) -> str:
    """`path` with each `{param}` filled with something of the right shape."""
    return re.sub(
        r"\{[^}]+\}", lambda m: "0" if "index" in m[0] else str(uuid.uuid4()), path
    )


async def test_auth_is_enforced_not_only_documented(client: TestClient) -> None:
    """Every route declared with auth answers 401 to a caller without
    credentials, before its handler runs (no 404, 405 or 422 first)."""
    checked = 0
    for table in route_tables():
        for endpoint in table.endpoints:
            if not endpoint.auth or endpoint.auth_optional:
                continue
            response = await client.request(
                endpoint.method, _concrete(endpoint.path), json={}
            )
            assert response.status == 401, (endpoint.method, endpoint.path)
            checked += 1
    assert checked >= 15


def _table() -> ApiRoutes:
    return ApiRoutes(tags=["test"])


def test_a_handler_takes_only_what_the_route_can_give() -> None:
    async def anonymous_caller(
        request: web.Request, *, principal: Principal
    ) -> web.StreamResponse:
        raise AssertionError

    with pytest.raises(TypeError, match="auth=False has no principal"):
        _table().route("GET", "/x", summary="x", responses=[], auth=False)(
            anonymous_caller
        )

    async def unknown(request: web.Request, *, user: Principal) -> web.StreamResponse:
        raise AssertionError

    with pytest.raises(TypeError, match="no route parameter"):
        _table().route("GET", "/x", summary="x", responses=[])(unknown)


def test_the_body_model_is_named_once_in_the_handler() -> None:
    async def create(
        request: web.Request, *, principal: Principal, body: TokenCreate
    ) -> web.StreamResponse:
        raise AssertionError

    table = _table()
    table.route("POST", "/x", summary="x", responses=[Response(201, "made")])(create)
    [endpoint] = table.endpoints
    assert endpoint.body is TokenCreate
    assert endpoint.takes == {"principal", "body"}
    assert endpoint.auth and not endpoint.body_optional


async def test_the_route_authenticates_before_the_handler_runs(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    ran: list[str] = []

    async def unguarded(request: web.Request) -> web.StreamResponse:
        ran.append(request.path)
        return web.json_response({})

    table = _table()
    table.route("GET", "/guarded", summary="x", responses=[])(unguarded)
    table.route("GET", "/open", summary="x", responses=[], auth=False)(unguarded)
    app = create_app(web_settings)
    table.add_to(app)
    client = await aiohttp_client(app)
    assert (await client.get("/guarded")).status == 401
    assert (await client.get("/open")).status == 200
    assert ran == ["/open"]

"""Headers: no sniffing, no caching of account data, a policy on pages, /metrics."""

from __future__ import annotations

import re
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from pydantic import SecretStr

from sdapi.devtools.accounts import auth, make_user
from web.app import create_app
from web.appkeys import settings_key
from web.errors import Forbidden
from web.routes.ops import _check_scraper
from web.settings import WebSettings


async def test_every_answer_says_nosniff(client: TestClient) -> None:
    for path in ("/healthz", "/api/v1/nope", "/docs", "/docs/assets/swagger-ui.css"):
        response = await client.get(path)
        assert response.headers["X-Content-Type-Options"] == "nosniff", path


async def test_answers_with_account_data_are_not_cached(client: TestClient) -> None:
    _, secret = await make_user()
    response = await client.get("/api/v1/me", headers=auth(secret))
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    signin = await client.post("/api/v1/auth/signin", json={"email": "x@y.z"})
    assert signin.headers["Cache-Control"] == "no-store"


async def test_pages_run_only_their_own_scripts_and_cannot_be_framed(
    client: TestClient,
) -> None:
    response = await client.get("/docs")
    policy = response.headers["Content-Security-Policy"]
    [scripts] = re.findall(r"script-src ([^;]*)", policy)
    assert scripts == "'self'"
    assert "frame-ancestors 'none'" in policy
    page = await response.text()
    # Every script is a file of the app's: none inline.
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", page) == []
    started = await client.get("/docs/init.js")
    assert started.status == 200 and "SwaggerUIBundle" in await started.text()


async def test_metrics_need_the_token_when_one_is_set(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(update={"metrics_token": SecretStr("scrape-me")})
    client = await aiohttp_client(create_app(settings))
    assert (await client.get("/metrics")).status == 401
    wrong = await client.get("/metrics", headers=auth("nope"))
    assert wrong.status == 401
    right = await client.get("/metrics", headers=auth("scrape-me"))
    assert right.status == 200
    assert "sdapi_queue_depth" in await right.text()


@pytest.mark.parametrize(
    ("peer", "allowed"), [("127.0.0.1", True), ("10.1.2.3", False)]
)
def test_without_a_token_metrics_are_for_this_host_only(
    web_settings: WebSettings, peer: str, allowed: bool
) -> None:
    app = web.Application()
    app[settings_key] = web_settings
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 40000) if name == "peername" else default
    )
    request = make_mocked_request("GET", "/metrics", app=app, transport=transport)
    if allowed:
        _check_scraper(request)
    else:
        with pytest.raises(Forbidden):
            _check_scraper(request)

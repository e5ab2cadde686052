"""Webhooks on web's side: the request's webhook (checked), the account's
secret and its rotation, `Generation.webhook`, cancellations."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from sdapi.db.models import OutboxStatus, WebhookDelivery, utcnow
from sdapi.devtools.accounts import auth, make_user
from tests.node_double import NodeDouble
from tests.web.conftest import AiohttpClient
from web.app import create_app
from web.settings import WebSettings

GENERATIONS = "/api/v1/generations"
SECRET = "/api/v1/webhooks/secret"
SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}
HOOK = "http://127.0.0.1:9/hook"


async def client_with(
    aiohttp_client: AiohttpClient, web_settings: WebSettings, **changes: Any
) -> TestClient:
    settings = web_settings.model_copy(update=changes)
    found: TestClient = await aiohttp_client(create_app(settings))
    return found


async def test_the_secret_is_stable_until_rotated(client: TestClient) -> None:
    _, token = await make_user()
    assert (await client.get(SECRET)).status == 401
    first = await (await client.get(SECRET, headers=auth(token))).json()
    assert first["secret"].startswith("whsec_")
    assert first["previous_expires_at"] is None
    again = await (await client.get(SECRET, headers=auth(token))).json()
    assert again == first
    response = await client.post(f"{SECRET}/rotate", headers=auth(token))
    assert response.status == 200
    rotated = await response.json()
    assert rotated["secret"] != first["secret"]
    expires = rotated["previous_expires_at"]
    assert expires is not None
    assert expires.endswith("Z")
    shown = await (await client.get(SECRET, headers=auth(token))).json()
    assert shown == rotated
    # Another account has its own.
    _, other = await make_user()
    theirs = await (await client.get(SECRET, headers=auth(other))).json()
    assert theirs["secret"] not in (first["secret"], rotated["secret"])


@pytest.mark.parametrize(
    ("webhook", "field", "words"),
    [
        ({"url": "http://127.0.0.1:8080/hook"}, "webhook.url", "loopback"),
        ({"url": "http://localhost/hook"}, "webhook.url", "loopback"),
        ({"url": "http://10.1.2.3/hook"}, "webhook.url", "private"),
        ({"url": "http://169.254.169.254/"}, "webhook.url", "metadata"),
        ({"url": "http://[::ffff:127.0.0.1]/"}, "webhook.url", "loopback"),
        ({"url": "ftp://93.184.216.34/"}, "webhook.url", "http"),
        ({"url": HOOK, "events": ["finished"]}, "webhook.events.0", ""),
        ({"url": HOOK, "events": []}, "webhook.events", ""),
        ({"url": HOOK, "events": ["image", "image"]}, "webhook.events", "twice"),
        ({"url": HOOK, "secret": "x"}, "webhook.secret", "Unknown"),
    ],
)
async def test_a_bad_webhook_is_a_422_naming_it(
    client: TestClient, node: NodeDouble, webhook: Any, field: str, words: str
) -> None:
    _, token = await make_user()
    response = await client.post(
        GENERATIONS, json={**SMALL, "webhook": webhook}, headers=auth(token)
    )
    body = await response.json()
    assert response.status == 422, body
    [detail] = body["error"]["details"]
    assert detail["field"] == field
    assert words in detail["message"]


async def test_a_slow_resolver_is_a_503(
    aiohttp_client: AiohttpClient, web_settings: WebSettings, node: NodeDouble
) -> None:
    client = await client_with(
        aiohttp_client, web_settings, webhook_resolve_timeout=0.000001
    )
    _, token = await make_user()
    response = await client.post(
        GENERATIONS,
        json={**SMALL, "webhook": {"url": "http://localhost/hook"}},
        headers=auth(token),
    )
    assert response.status == 503
    assert response.headers["Retry-After"]


async def test_the_webhook_is_shown_and_a_cancel_is_reported(
    aiohttp_client: AiohttpClient, web_settings: WebSettings, node: NodeDouble
) -> None:
    client = await client_with(aiohttp_client, web_settings, webhook_allow_private=True)
    _, token = await make_user()
    response = await client.post(
        GENERATIONS,
        json={**SMALL, "webhook": {"url": HOOK, "events": ["started", "completed"]}},
        headers=auth(token),
    )
    created = await response.json()
    assert response.status == 202, created
    assert created["request"]["webhook"] == {
        "url": HOOK,
        "events": ["started", "completed"],
    }
    assert created["webhook"] == {
        "url": HOOK,
        "events": ["started", "completed"],
        "event": None,
        "status": None,
        "attempts": 0,
        "delivered_at": None,
        "last_error": None,
    }
    url = f"{GENERATIONS}/{created['id']}"
    assert (await client.delete(url, headers=auth(token))).status == 204
    [row] = await WebhookDelivery.all()
    assert (row.event, row.status, row.url) == ("completed", OutboxStatus.PENDING, HOOK)
    payload = json.loads(row.body)
    assert payload["type"] == "generation.completed"
    assert payload["data"]["status"] == "cancelled"
    assert payload["data"]["id"] == created["id"]
    shown = await (await client.get(url, headers=auth(token))).json()
    assert shown["webhook"]["event"] == "completed"
    assert shown["webhook"]["status"] == "pending"
    # Without a webhook there is none.
    plain = await (
        await client.post(GENERATIONS, json=SMALL, headers=auth(token))
    ).json()
    assert plain["webhook"] is None
    assert plain["request"]["webhook"] is None


async def test_payload_image_links_work_without_a_token(
    aiohttp_client: AiohttpClient, web_settings: WebSettings, node: NodeDouble
) -> None:
    client = await client_with(aiohttp_client, web_settings, webhook_allow_private=True)
    _, token = await make_user()
    created = await (
        await client.post(
            GENERATIONS,
            json={**SMALL, "webhook": {"url": HOOK, "events": ["image"]}},
            headers=auth(token),
        )
    ).json()
    job = await node.claim()
    assert await node.run(job) == "succeeded"
    [row] = await WebhookDelivery.all()
    payload = json.loads(row.body)
    assert payload["type"] == "generation.image"
    assert payload["data"]["id"] == created["id"]
    link = urlsplit(payload["image"]["url"])
    response = await client.get(f"{link.path}?{link.query}")
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/png"
    sent = datetime.fromisoformat(payload["timestamp"])
    assert utcnow() - timedelta(minutes=1) < sent <= utcnow()


async def test_a_form_carries_the_webhook_as_json_text(
    aiohttp_client: AiohttpClient, web_settings: WebSettings, node: NodeDouble
) -> None:
    client = await client_with(aiohttp_client, web_settings, webhook_allow_private=True)
    _, token = await make_user()
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("prompt", "a red fox")
    form.add_field("width", "64")
    form.add_field("height", "64")
    form.add_field("webhook", json.dumps({"url": HOOK, "events": ["image"]}))
    response = await client.post(GENERATIONS, data=form, headers=auth(token))
    created = await response.json()
    assert response.status == 202, created
    assert created["webhook"]["url"] == HOOK
    assert created["webhook"]["events"] == ["image"]

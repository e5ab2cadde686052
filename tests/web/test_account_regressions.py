"""Regression tests from the accounts review."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest
from aiohttp.test_utils import TestClient

from sdapi.db.models import (
    OutboxEmail,
    User,
    utcnow,
)
from tests.support import until
from tests.web.accounts_support import (
    JSON,
    LINK,
    PASSWORD,
    REDEEM,
    RESEND,
    SIGNIN,
    SIGNUP,
    VERIFY,
    bearer,
    error_of,
    signin,
    signup,
)
from web.app import create_app
from web.settings import WebSettings

from .conftest import AiohttpClient


async def test_concurrent_wrong_signins_cannot_pass_the_limit(
    client: TestClient,
) -> None:
    await signup(client, "raced@example.org")
    wrong = {"email": "raced@example.org", "password": "wrong-wrong!"}
    responses = await asyncio.gather(
        *(client.post(SIGNIN, json=wrong) for _ in range(40))
    )
    statuses = sorted(response.status for response in responses)
    # Each attempt is counted before its password is checked, atomically: only
    # the per-email limit's 10 guesses are ever checked.
    assert statuses == [401] * 10 + [429] * 30
    # The right password is refused too while the email is locked.
    response = await client.post(
        SIGNIN, json={"email": "raced@example.org", "password": PASSWORD}
    )
    await error_of(response, 429, "rate_limited")


async def test_concurrent_sprays_from_one_client_cannot_pass_the_limit(
    aiohttp_client: AiohttpClient, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(update={"signin_max_failures_per_client": 15})
    client = await aiohttp_client(create_app(settings))
    responses = await asyncio.gather(
        *(
            client.post(
                SIGNIN, json={"email": f"spray{n}@example.org", "password": "guess!"}
            )
            for n in range(40)
        )
    )
    assert sorted(r.status for r in responses) == [401] * 15 + [429] * 25


async def test_a_successful_signin_is_not_counted_as_a_failure(
    aiohttp_client: AiohttpClient, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(update={"signin_max_failures_per_client": 3})
    client = await aiohttp_client(create_app(settings))
    await signup(client, "often@example.org")
    for _ in range(5):
        await signin(client, "often@example.org")


async def test_signups_from_one_client_are_throttled(
    aiohttp_client: AiohttpClient, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(
        update={"signup_max_per_client": 3, "signup_window": 600}
    )
    client = await aiohttp_client(create_app(settings))
    await signup(client, "first@example.org")
    await signup(client, "second@example.org")
    # A taken email counts too: probing which addresses exist is throttled.
    taken = await client.post(
        SIGNUP, json={"email": "first@example.org", "password": PASSWORD}
    )
    assert taken.status == 201
    refused = await client.post(
        SIGNUP, json={"email": "fourth@example.org", "password": PASSWORD}
    )
    await error_of(refused, 429, "rate_limited")
    assert 0 < int(refused.headers["Retry-After"]) <= 600
    assert not await User.exists(email_key="fourth@example.org")


async def test_concurrent_password_hashing_is_bounded(
    aiohttp_client: AiohttpClient,
    web_settings: WebSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    import bcrypt

    settings = web_settings.model_copy(update={"bcrypt_concurrency": 2})
    client = await aiohttp_client(create_app(settings))
    real_hashpw = bcrypt.hashpw
    lock = threading.Lock()
    running = 0
    most = 0
    release = threading.Event()

    def hashpw(password: bytes, salt: bytes) -> bytes:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            # Every run is held until two run at once (bounded, so a failing
            # test ends): the bound is reached, whatever the machine's speed.
            release.wait(timeout=10)
            return real_hashpw(password, salt)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(bcrypt, "hashpw", hashpw)
    # Unknown emails: each costs one bcrypt run, as a real check would.
    signing_in = asyncio.gather(
        *(
            client.post(
                SIGNIN, json={"email": f"nobody{n}@example.org", "password": "x" * 12}
            )
            for n in range(8)
        )
    )
    try:
        await until(lambda: running == 2, 10, "two bcrypt runs at once")
    finally:
        release.set()
    responses = await signing_in
    assert [r.status for r in responses] == [401] * 8
    assert most == 2


async def test_non_ascii_csrf_header_is_403_not_500(client: TestClient) -> None:
    await signup(client, "accent@example.org")
    await signin(client, "accent@example.org", session=True)
    response = await client.post(
        REDEEM, json={"code": "SDAPI-AAAAA"}, headers={"X-CSRF-Token": "é" * 43}
    )
    error = await error_of(response, 403, "forbidden")
    assert "CSRF" in error["message"]


async def test_resend_writes_a_new_link_that_verifies(client: TestClient) -> None:
    await signup(client, "lost-mail@example.org")
    tokens = await signin(client, "lost-mail@example.org")
    response = await client.post(RESEND, headers=bearer(tokens["token"]))
    assert response.status == 202, await response.text()
    body = await response.json()
    assert body["sent"] is True
    assert body["email"] == "lost-mail@example.org"
    assert datetime.fromisoformat(body["expires_at"]) > utcnow() + timedelta(days=2)

    rows = await OutboxEmail.filter(to_address="lost-mail@example.org").order_by(
        "created_at"
    )
    assert len(rows) == 2
    links = [LINK.search(row.text_body) for row in rows]
    assert all(links)
    first, second = (match.group(1) for match in links if match is not None)
    assert first != second
    verified = await client.get(VERIFY, params={"token": second}, headers=JSON)
    assert verified.status == 200
    assert (await verified.json())["user"]["email_verified"] is True

    # Verified now: nothing more to send.
    again = await client.post(RESEND, headers=bearer(tokens["token"]))
    await error_of(again, 409, "conflict")


async def test_resend_is_at_most_once_a_minute_per_user(client: TestClient) -> None:
    await signup(client, "impatient@example.org")
    await signup(client, "bystander2@example.org")
    tokens = await signin(client, "impatient@example.org")
    other = await signin(client, "bystander2@example.org")
    assert (await client.post(RESEND, headers=bearer(tokens["token"]))).status == 202
    refused = await client.post(RESEND, headers=bearer(tokens["token"]))
    await error_of(refused, 429, "rate_limited")
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    # Per user: another account is not held back.
    assert (await client.post(RESEND, headers=bearer(other["token"]))).status == 202
    assert await OutboxEmail.filter(to_address="impatient@example.org").count() == 2


async def test_resend_needs_a_user_and_csrf_with_a_cookie(client: TestClient) -> None:
    await error_of(await client.post(RESEND), 401, "unauthorized")
    await signup(client, "cookie-resend@example.org")
    body = await signin(client, "cookie-resend@example.org", session=True)
    await error_of(await client.post(RESEND), 403, "forbidden")
    response = await client.post(RESEND, headers={"X-CSRF-Token": body["csrf_token"]})
    assert response.status == 202


async def test_openapi_documents_the_resend_endpoint(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    operation = document["paths"][RESEND]["post"]
    assert "security" in operation
    assert {"202", "409", "429"} <= set(operation["responses"])
    ref = operation["responses"]["202"]["content"]["application/json"]["schema"]
    name = ref["$ref"].rsplit("/", 1)[1]
    assert set(document["components"]["schemas"][name]["properties"]) == {
        "sent",
        "email",
        "expires_at",
    }

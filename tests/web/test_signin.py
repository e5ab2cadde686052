"""Sign-in and sign-out with bearer tokens."""

from __future__ import annotations

import unicodedata
from datetime import datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sdapi.db.models import (
    ApiToken,
    User,
    utcnow,
)
from tests.web.accounts_support import (
    ME,
    OK,
    SIGNIN,
    SIGNOUT,
    bearer,
    error_of,
    signin,
    signup,
)
from web.tokens import hash_secret


async def test_signin_returns_a_bearer_token_for_me(client: TestClient) -> None:
    created = (await signup(client, "Linus@Example.org"))["user"]
    # Any case of the address signs in to the one account.
    body = await signin(client, "LINUS@example.ORG")
    assert set(body) == {"token", "token_type", "expires_at", "user", "csrf_token"}
    assert body["token_type"] == "bearer"
    assert body["csrf_token"] is None
    assert body["user"] == created
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert abs((expires_at - utcnow() - timedelta(days=30)).total_seconds()) < 60
    stored = await ApiToken.get(token_hash=hash_secret(body["token"]))
    assert stored.kind == "bearer"

    response = await client.get(ME, headers=bearer(body["token"]))
    assert response.status == 200
    me = await response.json()
    assert {key: me[key] for key in created} == created
    assert me["quota"] == {
        "images_today": 0,
        "images_per_day": 50,
        "in_flight": 0,
        "max_in_flight": None,
        "max_upload_bytes": 4 * 1024 * 1024,
        "max_upload_pixels": 2048 * 2048,
    }


async def test_wrong_password_and_unknown_email_get_the_same_401(
    client: TestClient,
) -> None:
    await signup(client, "known@example.org")
    wrong = await client.post(
        SIGNIN, json={"email": "known@example.org", "password": "wrong password"}
    )
    unknown = await client.post(
        SIGNIN, json={"email": "unknown@example.org", "password": "wrong password"}
    )
    assert wrong.status == unknown.status == 401
    assert await wrong.json() == await unknown.json()
    assert (await wrong.json())["error"]["code"] == "unauthorized"
    assert wrong.headers["WWW-Authenticate"] == unknown.headers["WWW-Authenticate"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"email": "a@example.org"}, id="missing-password"),
        pytest.param({**OK, "password": ""}, id="empty-password"),
        pytest.param({**OK, "password": "x" * 300}, id="long-password"),
        pytest.param({**OK, "email": "nobody"}, id="bad-email"),
        pytest.param({**OK, "remember": 1}, id="unknown-field"),
    ],
)
async def test_signin_rejects_bad_input(
    client: TestClient, body: dict[str, Any]
) -> None:
    await error_of(await client.post(SIGNIN, json=body), 422, "validation_error")


async def test_password_over_72_bytes_counts_every_byte(client: TestClient) -> None:
    # 100 characters, 200 UTF-8 bytes: bcrypt alone would stop at byte 72.
    long_password = "é" * 36 + "tail-one-" + "x" * 55
    assert len(long_password.encode()) > 72
    await signup(client, "long@example.org", long_password)
    await signin(client, "long@example.org", long_password)

    same_start = long_password[:-1] + "y"
    assert same_start.encode()[:72] == long_password.encode()[:72]
    response = await client.post(
        SIGNIN, json={"email": "long@example.org", "password": same_start}
    )
    await error_of(response, 401, "unauthorized")


async def test_non_ascii_password_works_composed_or_decomposed(
    client: TestClient,
) -> None:
    composed = unicodedata.normalize("NFC", "Fräulein Müller über Ærø 日本語")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    await signup(client, "unicode@example.org", composed)
    await signin(client, "unicode@example.org", composed)
    await signin(client, "unicode@example.org", decomposed)


async def test_expired_revoked_and_orphaned_tokens_are_401(client: TestClient) -> None:
    await signup(client, "tokens@example.org")
    expired = (await signin(client, "tokens@example.org"))["token"]
    revoked = (await signin(client, "tokens@example.org"))["token"]

    await ApiToken.filter(token_hash=hash_secret(expired)).update(
        expires_at=utcnow() - timedelta(seconds=1)
    )
    await error_of(await client.get(ME, headers=bearer(expired)), 401, "unauthorized")

    assert (await client.post(SIGNOUT, headers=bearer(revoked))).status == 204
    await error_of(await client.get(ME, headers=bearer(revoked)), 401, "unauthorized")
    await error_of(
        await client.post(SIGNOUT, headers=bearer(revoked)), 401, "unauthorized"
    )

    await error_of(await client.get(ME), 401, "unauthorized")
    await error_of(
        await client.get(ME, headers=bearer("sdapi_not-a-real-token")),
        401,
        "unauthorized",
    )
    await error_of(
        await client.get(ME, headers={"Authorization": "Basic abc"}),
        401,
        "unauthorized",
    )

    await signup(client, "gone@example.org")
    orphan = (await signin(client, "gone@example.org"))["token"]
    await User.filter(email_key="gone@example.org").delete()
    await error_of(await client.get(ME, headers=bearer(orphan)), 401, "unauthorized")


async def test_signout_revokes_only_the_token_used(client: TestClient) -> None:
    await signup(client, "two@example.org")
    first = (await signin(client, "two@example.org"))["token"]
    second = (await signin(client, "two@example.org"))["token"]
    response = await client.post(SIGNOUT, headers=bearer(first))
    assert response.status == 204
    assert await response.read() == b""
    await error_of(await client.get(ME, headers=bearer(first)), 401, "unauthorized")
    assert (await client.get(ME, headers=bearer(second))).status == 200

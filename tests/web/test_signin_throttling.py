"""Sign-in throttling per client and account."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from tests.web.accounts_support import (
    PASSWORD,
    SIGNIN,
    error_of,
    signin,
    signup,
)
from web.app import create_app
from web.appkeys import redis_key
from web.settings import WebSettings

from .conftest import AiohttpClient


async def test_thirty_wrong_signins_for_one_email_are_throttled(
    client: TestClient,
) -> None:
    await signup(client, "target@example.org")
    statuses = []
    for _ in range(30):
        response = await client.post(
            SIGNIN, json={"email": "target@example.org", "password": "guess-guess"}
        )
        statuses.append(response.status)
        if response.status == 429:
            error = await error_of(response, 429, "rate_limited")
            retry_after = int(response.headers["Retry-After"])
            assert 0 < retry_after <= 900
            assert str(retry_after) in error["message"]
    # Defaults: 10 failures per email within 15 minutes.
    assert statuses == [401] * 10 + [429] * 20

    # Refused before the password is looked at: the right one is refused too,
    # in any case of the address.
    response = await client.post(
        SIGNIN, json={"email": "TARGET@example.org", "password": PASSWORD}
    )
    await error_of(response, 429, "rate_limited")

    # Another account from the same address is not locked out (50 per client).
    await signup(client, "bystander@example.org")
    await signin(client, "bystander@example.org")


async def test_thirty_wrong_signins_from_one_client_are_throttled(
    aiohttp_client: AiohttpClient, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(
        update={"signin_max_failures_per_client": 20, "signin_failure_window": 60}
    )
    client = await aiohttp_client(create_app(settings))
    statuses = []
    for n in range(30):
        response = await client.post(
            SIGNIN, json={"email": f"spray{n}@example.org", "password": "guess-guess"}
        )
        statuses.append(response.status)
        if response.status == 429:
            assert 0 < int(response.headers["Retry-After"]) <= 60
    assert statuses == [401] * 20 + [429] * 10


async def test_throttling_uses_x_forwarded_for_only_when_trusted(
    aiohttp_client: AiohttpClient, web_settings: WebSettings
) -> None:
    async def statuses(settings: WebSettings) -> list[int]:
        client = await aiohttp_client(create_app(settings))
        await client.app[redis_key].flushdb()
        found = []
        for n in range(4):
            response = await client.post(
                SIGNIN,
                json={"email": f"fwd{n}@example.org", "password": "guess-guess"},
                # A forged hop first, then the one our proxy appended.
                headers={"X-Forwarded-For": f"203.0.113.{n}, 198.51.100.{n}"},
            )
            found.append(response.status)
        return found

    limited = {"signin_max_failures_per_client": 2}
    untrusted = web_settings.model_copy(update=limited)
    assert await statuses(untrusted) == [401, 401, 429, 429]
    trusted = web_settings.model_copy(update={**limited, "trust_forwarded": True})
    assert await statuses(trusted) == [401, 401, 401, 401]


async def test_a_successful_signin_clears_the_email_counter(client: TestClient) -> None:
    await signup(client, "forgetful@example.org")
    for _ in range(9):
        response = await client.post(
            SIGNIN, json={"email": "forgetful@example.org", "password": "nope-nope!"}
        )
        assert response.status == 401
    await signin(client, "forgetful@example.org")
    for _ in range(9):
        response = await client.post(
            SIGNIN, json={"email": "forgetful@example.org", "password": "nope-nope!"}
        )
        assert response.status == 401
    await signin(client, "forgetful@example.org")

"""The playground's cookie sessions and their CSRF token."""

from __future__ import annotations

from datetime import datetime, timedelta

from aiohttp.test_utils import TestClient

from sdapi.db.models import (
    ApiToken,
    User,
    utcnow,
)
from tests.web.accounts_support import (
    ME,
    PASSWORD,
    REDEEM,
    SIGNIN,
    SIGNOUT,
    bearer,
    error_of,
    set_cookie_of,
    signin,
    signup,
)
from web.app import create_app
from web.appkeys import redis_key
from web.devices import DEVICE_COOKIE
from web.sessions import SESSION_COOKIE, SESSION_KEY_PREFIX
from web.settings import WebSettings
from web.tokens import hash_secret

from .conftest import AiohttpClient


async def test_session_signin_sets_a_cookie_with_csrf_protection(
    client: TestClient,
) -> None:
    await signup(client, "cookie@example.org")
    # Verified: an unverified account may not redeem codes at all.
    await User.filter(email_key="cookie@example.org").update(email_verified_at=utcnow())
    # A session id planted before sign-in (fixation) must not be adopted.
    client.session.cookie_jar.update_cookies({SESSION_COOKIE: "planted-by-attacker"})
    response = await client.post(
        SIGNIN,
        json={"email": "cookie@example.org", "password": PASSWORD, "session": True},
    )
    assert response.status == 200
    body = await response.json()
    csrf = body["csrf_token"]
    assert isinstance(csrf, str)
    assert len(csrf) >= 32

    set_cookie = set_cookie_of(response, SESSION_COOKIE)
    assert "HttpOnly" in set_cookie
    assert "SameSite=Lax" in set_cookie
    assert "Secure" not in set_cookie  # http:// base URL
    session_id = response.cookies[SESSION_COOKIE].value
    assert session_id != "planted-by-attacker"
    redis = client.app[redis_key]
    assert await redis.exists(SESSION_KEY_PREFIX + session_id)
    # One credential: the token returned is the session's own, no bearer token.
    stored = await ApiToken.get()
    assert stored.kind == "session"
    assert stored.token_hash == hash_secret(body["token"])
    assert stored.expires_at > utcnow() + timedelta(days=6)
    assert datetime.fromisoformat(body["expires_at"]) == stored.expires_at

    # The cookie alone authenticates safe requests...
    me = await client.get(ME)
    assert me.status == 200
    assert (await me.json())["email"] == "cookie@example.org"
    # ... but an unsafe one needs the CSRF token in a header.
    error = await error_of(
        await client.post(REDEEM, json={"code": "SDAPI-AAAAA"}), 403, "forbidden"
    )
    assert "CSRF" in error["message"]
    await error_of(
        await client.post(REDEEM, json={"code": "x"}, headers={"X-CSRF-Token": "bad"}),
        403,
        "forbidden",
    )
    await error_of(
        await client.post(
            REDEEM, json={"code": "SDAPI-AAAAA"}, headers={"X-CSRF-Token": csrf}
        ),
        404,
        "not_found",
    )
    await error_of(await client.post(SIGNOUT), 403, "forbidden")

    # Sign-out kills the session server-side at once.
    response = await client.post(SIGNOUT, headers={"X-CSRF-Token": csrf})
    assert response.status == 204
    assert not await redis.exists(SESSION_KEY_PREFIX + session_id)
    assert (await ApiToken.get(id=stored.id)).revoked_at is not None
    # Even a client that keeps the old cookie is out.
    client.session.cookie_jar.update_cookies({SESSION_COOKIE: session_id})
    await error_of(await client.get(ME), 401, "unauthorized")
    # The token the sign-in returned was the session's: it is out too.
    await error_of(
        await client.get(ME, headers=bearer(body["token"])), 401, "unauthorized"
    )


async def test_signing_out_with_a_session_token_ends_the_cookie_session(
    client: TestClient,
) -> None:
    await signup(client, "one-credential@example.org")
    body = await signin(client, "one-credential@example.org", session=True)
    assert (await client.get(ME)).status == 200  # by cookie
    assert (await client.get(ME, headers=bearer(body["token"]))).status == 200

    response = await client.post(SIGNOUT, headers=bearer(body["token"]))
    assert response.status == 204
    await error_of(
        await client.get(ME, headers=bearer(body["token"])), 401, "unauthorized"
    )
    # The cookie alone no longer works either.
    await error_of(await client.get(ME), 401, "unauthorized")
    assert await ApiToken.filter(revoked_at=None).count() == 0


async def test_signing_in_again_replaces_the_previous_session(
    client: TestClient,
) -> None:
    await signup(client, "again@example.org")
    body = {"email": "again@example.org", "password": PASSWORD, "session": True}
    first = await client.post(SIGNIN, json=body)
    first_id = first.cookies[SESSION_COOKIE].value
    second = await client.post(SIGNIN, json=body)
    second_id = second.cookies[SESSION_COOKIE].value
    assert first_id != second_id
    redis = client.app[redis_key]
    assert not await redis.exists(SESSION_KEY_PREFIX + first_id)
    assert await redis.exists(SESSION_KEY_PREFIX + second_id)
    assert await ApiToken.filter(kind="session", revoked_at=None).count() == 1


async def test_session_cookie_is_secure_behind_https(
    aiohttp_client: AiohttpClient, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(update={"public_url": "https://sdapi.example"})
    client = await aiohttp_client(create_app(settings))
    await signup(client, "tls@example.org")
    response = await client.post(
        SIGNIN,
        json={"email": "tls@example.org", "password": PASSWORD, "session": True},
    )
    assert response.status == 200
    set_cookie = set_cookie_of(response, SESSION_COOKIE)
    assert "Secure" in set_cookie
    assert "HttpOnly" in set_cookie
    assert "SameSite=Lax" in set_cookie
    assert "Secure" in set_cookie_of(response, DEVICE_COOKIE)

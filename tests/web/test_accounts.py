"""Accounts API: sign-up, verification by email, sign-in/out, sessions, /me, premium.

Real PostgreSQL and Redis; the verification email goes through the outbox and
the real sender to an aiosmtpd sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import re
import unicodedata
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from jobs.email_sender import send_due_emails
from jobs.resources import JobsResources
from jobs.settings import JobsSettings
from sdapi.contract.status import Status, Tier
from sdapi.db.models import (
    ApiToken,
    Delivery,
    EmailLink,
    Generation,
    LinkPurpose,
    OutboxEmail,
    PremiumCode,
    User,
    utcnow,
)
from sdapi.db.premium import canonical_code, code_hash, new_code
from sdapi.devtools.mailsink import mail_sink, read_messages
from sdapi.infra.registry import NodeRegistry
from tests.support import until
from web.app import create_app
from web.appkeys import redis_key
from web.devices import DEVICE_COOKIE
from web.quota import usage
from web.sessions import SESSION_COOKIE, SESSION_KEY_PREFIX
from web.settings import WebSettings
from web.tokens import hash_secret

from .conftest import AiohttpClient

PASSWORD = "correct horse battery"
SIGNUP = "/api/v1/auth/signup"
SIGNIN = "/api/v1/auth/signin"
SIGNOUT = "/api/v1/auth/signout"
VERIFY = "/api/v1/auth/verify"
ME = "/api/v1/me"
REDEEM = "/api/v1/premium/redeem"
JSON = {"Accept": "application/json"}
BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
LINK = re.compile(r"http://testserver\.local/api/v1/auth/verify\?token=([\w-]+)")


async def signup(
    client: TestClient, email_address: str, password: str = PASSWORD, **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        SIGNUP, json={"email": email_address, "password": password, **extra}
    )
    assert response.status == 201, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def signin(
    client: TestClient, email_address: str, password: str = PASSWORD, **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        SIGNIN, json={"email": email_address, "password": password, **extra}
    )
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    """The error object of a response that must be `status` / `code`."""
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


async def verification_token(email_address: str) -> str:
    """The token in the verification email written to the outbox."""
    row = await OutboxEmail.get(to_address=email_address)
    match = LINK.search(row.text_body)
    assert match is not None, row.text_body
    assert match.group(0) in (row.html_body or "")
    return match.group(1)


async def make_code(days: int) -> str:
    code = new_code()
    canonical = canonical_code(code)
    assert canonical is not None
    await PremiumCode.create(code_hash=code_hash(canonical), days=days)
    return code


# --- sign-up ----------------------------------------------------------------


async def test_signup_creates_user_and_writes_verification_email(
    client: TestClient,
) -> None:
    before = utcnow()
    body = await signup(client, "Ada.Lovelace@Example.COM", name="  Ada  ")
    user = body["user"]
    assert set(user) == {
        "id",
        "email",
        "name",
        "tier",
        "premium_until",
        "email_verified",
        "created_at",
    }
    assert user["email"] == "Ada.Lovelace@example.com"
    assert user["name"] == "Ada"
    assert user["tier"] == "normal"
    assert user["premium_until"] is None
    assert user["email_verified"] is False
    assert uuid.UUID(user["id"])
    assert datetime.fromisoformat(user["created_at"]) >= before - timedelta(seconds=1)

    row = await User.get(id=user["id"])
    assert row.email_key == "ada.lovelace@example.com"
    assert row.password_hash.startswith("sdapi1$$2b$04$")
    assert PASSWORD not in row.password_hash

    token = await verification_token("Ada.Lovelace@example.com")
    verification = await EmailLink.get(user_id=row.id, purpose=LinkPurpose.VERIFY)
    # Only the hash is stored; it expires after verify_ttl (3 days by default).
    assert verification.token_hash == hash_secret(token)
    assert token not in verification.token_hash
    expected = utcnow() + timedelta(days=3)
    assert abs((verification.expires_at - expected).total_seconds()) < 60


async def test_duplicate_email_in_another_case_makes_no_second_account(
    client: TestClient,
) -> None:
    await signup(client, "grace@example.org")
    response = await client.post(
        SIGNUP, json={"email": "GRACE@Example.org", "password": "another password"}
    )
    assert response.status == 201
    assert await User.filter(email_key="grace@example.org").count() == 1
    # The verification, then a note to the owner instead of a second one.
    [verify, notice] = await OutboxEmail.all().order_by("created_at")
    assert verify.subject.startswith("Verify")
    assert notice.to_address == "grace@example.org"
    assert "tried to sign up" in notice.subject


async def test_concurrent_signups_of_one_email_make_one_account(
    client: TestClient,
) -> None:
    responses = await asyncio.gather(
        *(
            client.post(
                SIGNUP, json={"email": f"{case}@example.org", "password": PASSWORD}
            )
            for case in ("twin", "TWIN", "Twin")
        )
    )
    assert [response.status for response in responses] == [201, 201, 201]
    assert await User.all().count() == 1
    assert await OutboxEmail.filter(subject__startswith="Verify").count() == 1


def _json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


OK = {"email": "a@example.org", "password": "0123456789"}
FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("body", "content_type", "status", "field"),
    [
        pytest.param(b'{"email": "a@', "application/json", 400, None, id="bad-json"),
        pytest.param(b"email=a@example.org", FORM, 400, None, id="form-body"),
        pytest.param(_json(**OK), "text/plain", 400, None, id="text-plain"),
        pytest.param(b"", "application/json", 400, None, id="empty-body"),
        pytest.param(b'["a@example.org"]', "application/json", 400, None, id="array"),
        pytest.param(
            _json(**OK, admin=True), "application/json", 422, "admin", id="unknown"
        ),
        pytest.param(
            _json(email="a@example.org"), "application/json", 422, "password",
            id="missing-password",
        ),
        pytest.param(
            _json(password="0123456789"), "application/json", 422, "email",
            id="missing-email",
        ),
        pytest.param(
            _json(**{**OK, "email": "no-at-sign.example.org"}), "application/json",
            422, "email", id="email-without-at",
        ),
        pytest.param(
            _json(**{**OK, "password": "short"}), "application/json", 422,
            "password", id="password-too-short",
        ),
        pytest.param(
            _json(**{**OK, "password": "x" * 257}), "application/json", 422,
            "password", id="password-too-long",
        ),
        pytest.param(
            _json(**{**OK, "password": 1234567890}), "application/json", 422,
            "password", id="password-not-a-string",
        ),
        pytest.param(
            _json(**OK, name="n" * 101), "application/json", 422, "name",
            id="name-too-long",
        ),
    ],
)  # fmt: skip
async def test_signup_rejects_bad_input(
    client: TestClient,
    body: bytes,
    content_type: str,
    status: int,
    field: str | None,
) -> None:
    response = await client.post(
        SIGNUP, data=body, headers={"Content-Type": content_type}
    )
    code = "bad_request" if status == 400 else "validation_error"
    error = await error_of(response, status, code)
    if field is not None:
        assert [detail["field"] for detail in error["details"]] == [field]
        assert all(detail["message"] for detail in error["details"])
    assert await User.all().count() == 0


async def test_body_over_the_size_limit_is_413(
    aiohttp_client: AiohttpClient, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(update={"max_body_bytes": 1024})
    client = await aiohttp_client(create_app(settings))
    padding = "x" * 4096
    response = await client.post(
        SIGNUP,
        json={"email": "big@example.org", "password": PASSWORD, "name": padding},
    )
    await error_of(response, 413, "payload_too_large")
    response = await client.post(SIGNIN, json={"email": padding, "password": padding})
    await error_of(response, 413, "payload_too_large")


# --- verification -----------------------------------------------------------


def jobs_resources(client: TestClient, smtp_url: str, tmp_path: Path) -> JobsResources:
    """The jobs worker's resources, sharing the app's database and Redis."""
    redis = client.app[redis_key]
    settings = JobsSettings(
        database_url="postgres://unused/unused",
        redis_url="redis://unused/0",
        smtp_url=smtp_url,
        data_dir=tmp_path,
        secret_key=SecretStr("test-secret-key"),
        public_url="http://testserver.local",
    )
    return JobsResources(
        settings=settings,
        redis=redis,
        registry=NodeRegistry(redis),
        stack=contextlib.AsyncExitStack(),
    )


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    folder = tmp_path / "mail"
    with mail_sink(folder) as url:
        yield url, folder


async def test_verification_email_arrives_and_its_link_verifies(
    client: TestClient, sink: tuple[str, Path], tmp_path: Path
) -> None:
    smtp_url, folder = sink
    await signup(client, "mary@example.org", name="Mary")
    await send_due_emails(jobs_resources(client, smtp_url, tmp_path))

    [raw] = read_messages(folder)
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["To"] == "mary@example.org"
    assert "Verify" in message["Subject"]
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None
    assert html is not None
    match = LINK.search(text.get_content())
    assert match is not None
    assert match.group(0) in html.get_content()
    assert (await OutboxEmail.get(to_address="mary@example.org")).status == "sent"

    # Follow the link as the browser would (the test server is not at
    # testserver.local, so only the path and query are requested).
    path = match.group(0).removeprefix("http://testserver.local")
    response = await client.get(path, headers=BROWSER)
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    assert "verified" in page
    assert "mary@example.org" in page

    tokens = await signin(client, "mary@example.org")
    me = await client.get(ME, headers=bearer(tokens["token"]))
    assert (await me.json())["email_verified"] is True


async def test_verify_answers_json_for_api_clients(client: TestClient) -> None:
    await signup(client, "json@example.org")
    token = await verification_token("json@example.org")
    response = await client.get(VERIFY, params={"token": token}, headers=JSON)
    assert response.status == 200
    body = await response.json()
    assert body["user"]["email"] == "json@example.org"
    assert body["user"]["email_verified"] is True
    user = await User.get(email_key="json@example.org")
    assert user.email_verified_at is not None

    # A used link: a clear error in both forms, and nothing changes.
    again = await client.get(VERIFY, params={"token": token}, headers=JSON)
    error = await error_of(again, 409, "conflict")
    assert "already been used" in error["message"]
    page = await client.get(VERIFY, params={"token": token}, headers=BROWSER)
    assert page.status == 409
    assert page.content_type == "text/html"
    assert "already been used" in await page.text()


async def test_verify_rejects_unknown_expired_and_missing_tokens(
    client: TestClient,
) -> None:
    await signup(client, "late@example.org")
    token = await verification_token("late@example.org")

    response = await client.get(VERIFY, params={"token": "nope"}, headers=JSON)
    await error_of(response, 404, "not_found")
    page = await client.get(VERIFY, params={"token": "nope"}, headers=BROWSER)
    assert page.status == 404
    assert "not valid" in await page.text()

    response = await client.get(VERIFY, headers=JSON)
    error = await error_of(response, 422, "validation_error")
    assert error["details"][0]["field"] == "token"
    page = await client.get(VERIFY, headers=BROWSER)
    assert page.status == 422
    assert "incomplete" in await page.text()

    await EmailLink.filter(
        purpose=LinkPurpose.VERIFY, token_hash=hash_secret(token)
    ).update(expires_at=utcnow() - timedelta(seconds=1))
    response = await client.get(VERIFY, params={"token": token}, headers=JSON)
    error = await error_of(response, 410, "gone")
    assert "expired" in error["message"]
    page = await client.get(VERIFY, params={"token": token})
    assert page.status == 410
    assert "expired" in await page.text()
    user = await User.get(email_key="late@example.org")
    assert user.email_verified_at is None


# --- sign-in ----------------------------------------------------------------


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


# --- throttling ---------------------------------------------------------------


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


# --- sessions (the playground) ---------------------------------------------


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


def set_cookie_of(response: Any, name: str) -> str:
    """The one Set-Cookie header of a response that sets `name`."""
    [header] = [
        value
        for value in response.headers.getall("Set-Cookie", [])
        if value.startswith(f"{name}=")
    ]
    return str(header)


# --- /me quota --------------------------------------------------------------


async def add_generation(
    user_id: Any,
    *,
    status: Status,
    num_images: int,
    tier: Tier = Tier.NORMAL,
    created_at: datetime | None = None,
) -> None:
    generation = await Generation.create(
        user_id=user_id,
        tier=tier,
        status=status,
        delivery=Delivery.EMAIL,
        model="tiny",
        request={"prompt": "a cat"},
        width=64,
        height=64,
        steps=4,
        guidance_scale=5.0,
        scheduler="euler",
        num_images=num_images,
    )
    if created_at is not None:
        await Generation.filter(id=generation.id).update(created_at=created_at)


async def test_usage_counts_todays_images_and_premium_work_in_flight(
    client: TestClient,
) -> None:
    user_id = (await signup(client, "quota@example.org"))["user"]["id"]
    other_id = (await signup(client, "other@example.org"))["user"]["id"]
    now = datetime(2031, 5, 17, 0, 30, tzinfo=UTC)
    today = now.replace(minute=5)
    yesterday = now - timedelta(hours=1)
    for status, images, when in [
        (Status.SUCCEEDED, 3, today),
        (Status.SCHEDULED, 2, today),
        (Status.FAILED, 4, today),  # failures give their images back
        (Status.CANCELLED, 5, today),
        (Status.SUCCEEDED, 7, yesterday),  # 23:30 UTC the day before
    ]:
        await add_generation(user_id, status=status, num_images=images, created_at=when)
    for owner, status, when in [
        (user_id, Status.QUEUED, today),
        (user_id, Status.RUNNING, yesterday),  # in flight, but counted yesterday
        (user_id, Status.SUCCEEDED, today),
        (other_id, Status.QUEUED, today),  # someone else's
    ]:
        await add_generation(
            owner, status=status, num_images=1, tier=Tier.PREMIUM, created_at=when
        )

    user = await User.get(id=user_id)
    used = await usage(user, now)
    assert used.images_today == 3 + 2 + 1 + 1
    assert used.in_flight == 2


async def test_me_shows_the_quota_of_the_current_tier(client: TestClient) -> None:
    user_id = (await signup(client, "me@example.org"))["user"]["id"]
    token = (await signin(client, "me@example.org"))["token"]
    await add_generation(user_id, status=Status.SUCCEEDED, num_images=3)
    await add_generation(user_id, status=Status.QUEUED, num_images=2, tier=Tier.PREMIUM)
    me = await (await client.get(ME, headers=bearer(token))).json()
    assert me["tier"] == "normal"
    assert me["quota"] == {
        "images_today": 5,
        "images_per_day": 50,
        "in_flight": 1,
        "max_in_flight": None,
        "max_upload_bytes": 4 * 1024 * 1024,
        "max_upload_pixels": 2048 * 2048,
    }
    await User.filter(id=user_id).update(premium_until=utcnow() + timedelta(days=1))
    me = await (await client.get(ME, headers=bearer(token))).json()
    assert me["tier"] == "premium"
    assert me["quota"]["images_per_day"] == 2000
    assert me["quota"]["max_in_flight"] == 4


# --- premium codes ------------------------------------------------------------


async def mark_verified(*addresses: str) -> None:
    """As following the emailed link would: redeeming needs a verified address."""
    await User.filter(email_key__in=list(addresses)).update(email_verified_at=utcnow())


async def test_redeem_adds_the_codes_days_to_premium_time_left(
    client: TestClient,
) -> None:
    await signup(client, "buyer@example.org")
    await mark_verified("buyer@example.org")
    token = (await signin(client, "buyer@example.org"))["token"]
    three, two = await make_code(3), await make_code(2)

    before = utcnow()
    response = await client.post(REDEEM, json={"code": three}, headers=bearer(token))
    assert response.status == 200
    user = await response.json()
    assert user["tier"] == "premium"
    until = datetime.fromisoformat(user["premium_until"])
    assert before + timedelta(days=3) <= until <= utcnow() + timedelta(days=3)

    # Typed sloppily: lower case, spaces instead of dashes, 0 for O.
    sloppy = two.lower().replace("-", " ").replace("o", "0")
    response = await client.post(REDEEM, json={"code": sloppy}, headers=bearer(token))
    assert response.status == 200
    later = datetime.fromisoformat((await response.json())["premium_until"])
    assert later == until + timedelta(days=2)

    stored = await PremiumCode.filter(redeemed_at__not_isnull=True).count()
    assert stored == 2


async def test_redeem_rejects_used_unknown_and_malformed_codes(
    client: TestClient,
) -> None:
    await signup(client, "first@example.org")
    await signup(client, "second@example.org")
    await mark_verified("first@example.org", "second@example.org")
    first = (await signin(client, "first@example.org"))["token"]
    second = (await signin(client, "second@example.org"))["token"]
    code = await make_code(1)
    assert (
        await client.post(REDEEM, json={"code": code}, headers=bearer(first))
    ).status == 200

    for token in (first, second):
        response = await client.post(REDEEM, json={"code": code}, headers=bearer(token))
        error = await error_of(response, 409, "conflict")
        assert "already been redeemed" in error["message"]
    unknown = new_code()
    response = await client.post(REDEEM, json={"code": unknown}, headers=bearer(second))
    await error_of(response, 404, "not_found")
    for text in ("SDAPI-!!!", "hello", "SDAPI-AAAAA-AAAAA-AAAAA-AAAA"):
        response = await client.post(
            REDEEM, json={"code": text}, headers=bearer(second)
        )
        await error_of(response, 404, "not_found")
    for body in ({}, {"code": ""}, {"code": code, "days": 99}, {"code": 12}):
        response = await client.post(REDEEM, json=body, headers=bearer(second))
        await error_of(response, 422, "validation_error")
    await error_of(await client.post(REDEEM, json={"code": code}), 401, "unauthorized")
    second_user = await User.get(email_key="second@example.org")
    assert second_user.premium_until is None


async def test_two_concurrent_redeems_of_one_code_succeed_once(
    client: TestClient,
) -> None:
    tokens = []
    for name in ("racer1", "racer2"):
        await signup(client, f"{name}@example.org")
        await mark_verified(f"{name}@example.org")
        tokens.append((await signin(client, f"{name}@example.org"))["token"])
    for _ in range(3):
        code = await make_code(5)
        responses = await asyncio.gather(
            *(
                client.post(REDEEM, json={"code": code}, headers=bearer(token))
                for token in [*tokens, tokens[0]]
            )
        )
        assert sorted(response.status for response in responses) == [200, 409, 409]
        row = await PremiumCode.get(code_hash=code_hash(canonical_code(code) or ""))
        assert row.redeemed_at is not None
    users = await User.filter(email_key__startswith="racer")
    granted = sum(
        round((user.premium_until - utcnow()).total_seconds() / 86400)
        for user in users
        if user.premium_until is not None
    )
    assert granted == 15


# --- the whole journey and the event loop -----------------------------------------


async def test_full_flow_signup_verify_signin_me_redeem_signout(
    client: TestClient, sink: tuple[str, Path], tmp_path: Path
) -> None:
    smtp_url, folder = sink
    await signup(client, "journey@example.org", "a journey password")
    await send_due_emails(jobs_resources(client, smtp_url, tmp_path))
    [raw] = read_messages(folder)
    message = email.message_from_bytes(raw, policy=email.policy.default)
    body = message.get_body(("plain",))
    assert body is not None
    match = LINK.search(body.get_content())
    assert match is not None
    verified = await client.get(VERIFY, params={"token": match.group(1)}, headers=JSON)
    assert (await verified.json())["user"]["email_verified"] is True

    token = (await signin(client, "journey@example.org", "a journey password"))["token"]
    me = await (await client.get(ME, headers=bearer(token))).json()
    assert me["email_verified"] is True
    assert me["tier"] == "normal"

    code = await make_code(30)
    redeemed = await client.post(REDEEM, json={"code": code}, headers=bearer(token))
    assert (await redeemed.json())["tier"] == "premium"
    me = await (await client.get(ME, headers=bearer(token))).json()
    assert me["tier"] == "premium"
    assert me["quota"]["max_in_flight"] == 4

    assert (await client.post(SIGNOUT, headers=bearer(token))).status == 204
    await error_of(await client.get(ME, headers=bearer(token)), 401, "unauthorized")


async def test_bcrypt_never_blocks_the_event_loop(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import bcrypt

    await signup(client, "slow@example.org")
    real_checkpw = bcrypt.checkpw
    checking = threading.Event()
    release = threading.Event()

    def checkpw(password: bytes, hashed: bytes) -> bool:
        # Held until the test has been answered meanwhile (bounded, so a
        # failing test ends).
        checking.set()
        release.wait(timeout=10)
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    signing_in = asyncio.create_task(signin(client, "slow@example.org"))
    try:
        await until(checking.is_set, 10, "the sign-in's bcrypt run")
        # An inline bcrypt would hold the loop: nothing else would answer
        # until the sign-in had.
        response = await client.get("/healthz")
        assert response.status == 200
        assert not signing_in.done()
    finally:
        release.set()
    await signing_in


async def test_openapi_documents_the_accounts_api(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    paths = document["paths"]
    for path, method in [
        (SIGNUP, "post"),
        (VERIFY, "get"),
        (SIGNIN, "post"),
        (SIGNOUT, "post"),
        (ME, "get"),
        (REDEEM, "post"),
    ]:
        assert method in paths[path], path
    assert "security" not in paths[SIGNUP]["post"]
    assert "security" in paths[ME]["get"]
    schemas = document["components"]["schemas"]
    assert {"User", "Me", "Quota", "SigninResponse", "SignupRequest"} <= set(schemas)
    assert schemas["SignupRequest"]["additionalProperties"] is False


# --- regression tests of the review ---------------------------------------

RESEND = "/api/v1/auth/verify/resend"


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

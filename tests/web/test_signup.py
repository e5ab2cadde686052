"""Sign-up: accounts, passwords, names and the verification mail."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta

import pytest
from aiohttp.test_utils import TestClient

from sdapi.db.models import (
    EmailLink,
    LinkPurpose,
    OutboxEmail,
    User,
    utcnow,
)
from tests.web.accounts_support import (
    FORM,
    OK,
    PASSWORD,
    SIGNIN,
    SIGNUP,
    _json,
    error_of,
    signup,
    verification_token,
)
from web.app import create_app
from web.settings import WebSettings
from web.tokens import hash_secret

from .conftest import AiohttpClient


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

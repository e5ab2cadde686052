"""Email verification: the link, its page, resends."""

from __future__ import annotations

import email
import email.policy
from datetime import timedelta
from pathlib import Path

from aiohttp.test_utils import TestClient

from jobs.email_sender import send_due_emails
from sdapi.db.models import (
    EmailLink,
    LinkPurpose,
    OutboxEmail,
    User,
    utcnow,
)
from sdapi.devtools.mailsink import read_messages
from tests.web.accounts_support import (
    BROWSER,
    JSON,
    LINK,
    ME,
    VERIFY,
    bearer,
    error_of,
    jobs_resources,
    signin,
    signup,
    verification_token,
)
from web.tokens import hash_secret


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

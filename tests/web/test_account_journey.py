"""The whole account journey, and bcrypt off the event loop."""

from __future__ import annotations

import asyncio
import email
import email.policy
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from jobs.email_sender import send_due_emails
from sdapi.devtools.mailsink import read_messages
from tests.support import until
from tests.web.accounts_support import (
    JSON,
    LINK,
    ME,
    REDEEM,
    SIGNIN,
    SIGNOUT,
    SIGNUP,
    VERIFY,
    bearer,
    error_of,
    jobs_resources,
    make_code,
    signin,
    signup,
)


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

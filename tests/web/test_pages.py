"""The playground's pages: who may open which."""

from __future__ import annotations

from aiohttp.test_utils import TestClient


async def test_forgot_password_page_opens_for_visitors(client: TestClient) -> None:
    # The sign-in page links here: someone who forgot the password has no session.
    response = await client.get("/forgot-password", allow_redirects=False)
    assert response.status == 200
    assert 'id="forgot-form"' in await response.text()


async def test_signed_in_pages_send_visitors_to_sign_in(client: TestClient) -> None:
    for path in ("/", "/history", "/tokens", "/account"):
        response = await client.get(path, allow_redirects=False)
        assert response.status == 303, path
        assert response.headers["Location"] == f"/signin?next={path}"

"""The playground's pages: who may open which."""

from __future__ import annotations

from html.parser import HTMLParser

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


class _SubmitButtons(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "button" and ("type", "submit") in attrs:
            self.found.append(dict(attrs))


async def test_forms_cannot_be_sent_before_their_script_runs(
    client: TestClient,
) -> None:
    # Sent by the browser itself, a form would go out as a GET with its fields
    # (a password) in the URL: its button waits for sdapi.js to enable it.
    for path in ("/signin", "/signup", "/forgot-password"):
        parser = _SubmitButtons()
        parser.feed(await (await client.get(path)).text())
        assert parser.found, path
        for button in parser.found:
            assert "disabled" in button, (path, button)
            assert "data-needs-script" in button, (path, button)

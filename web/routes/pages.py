"""The playground's HTML pages: shells the page scripts fill from the public API.

Every page is rendered by jinja2 (escaped); the scripts in web/static talk to
the same REST and WebSocket endpoints as any client, with the session cookie
and the session's CSRF token. Pages are not part of the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from aiohttp_session import get_session

from sdapi.db.models import utcnow
from web.auth import Principal, authenticate
from web.errors import Unauthorized
from web.openapi import ApiRoutes, Response

routes = ApiRoutes(tags=["pages"])
HandlerFn = Callable[[web.Request], Awaitable[web.StreamResponse]]

SIGNIN_PATH = "/signin"


async def _signed_in(request: web.Request) -> Principal | None:
    """The session's user; a bearer token does not sign a browser in."""
    try:
        principal = await authenticate(request)
    except Unauthorized:
        return None
    if principal is None or principal.via != "session":
        return None
    return principal


async def _render_page(
    request: web.Request, template: str, title: str, *, signed_in: bool | None = True
) -> web.StreamResponse:
    """Render a page; `signed_in` True: for users, False: for visitors (a user
    goes to the playground), None: for either."""
    principal = await _signed_in(request)
    if signed_in is True and principal is None:
        raise web.HTTPSeeOther(f"{SIGNIN_PATH}?next={request.path}")
    if signed_in is False and principal is not None:
        raise web.HTTPSeeOther("/")
    context: dict[str, Any] = {"title": title, "page": template, "user": None}
    if principal is not None:
        session = await get_session(request)
        user = principal.user
        context.update(
            user=user,
            tier=user.tier_at(utcnow()).value,
            csrf_token=session.get("csrf", ""),
        )
    response = aiohttp_jinja2.render_template(
        f"pages/{template}.html.j2", request, context
    )
    # Pages show account data: never from a shared cache.
    response.headers["Cache-Control"] = "no-store"
    return response


def _page_route(path: str, summary: str) -> Callable[[HandlerFn], HandlerFn]:
    return routes.route(
        "GET",
        path,
        summary=summary,
        auth=False,
        hidden=True,
        responses=[Response(200, summary, content_type="text/html")],
    )


@_page_route("/", "The playground")
async def playground_page(request: web.Request) -> web.StreamResponse:
    """Generate images; signed-out visitors are sent to sign in."""
    return await _render_page(request, "playground", "Playground")


@_page_route("/history", "Your generations")
async def history_page(request: web.Request) -> web.StreamResponse:
    """Past and pending generations, newest first."""
    return await _render_page(request, "history", "History")


@_page_route("/tokens", "API tokens")
async def tokens_page(request: web.Request) -> web.StreamResponse:
    """Personal tokens for scripts and the OpenAI SDK."""
    return await _render_page(request, "tokens", "API tokens")


@_page_route("/account", "Your account")
async def account_page(request: web.Request) -> web.StreamResponse:
    """Tier, premium time left, today's quota, premium codes."""
    return await _render_page(request, "account", "Account")


@_page_route(SIGNIN_PATH, "Sign in")
async def signin_page(request: web.Request) -> web.StreamResponse:
    """Email and password; starts a cookie session."""
    return await _render_page(request, "signin", "Sign in", signed_in=False)


@_page_route("/signup", "Sign up")
async def signup_page(request: web.Request) -> web.StreamResponse:
    """A new account; a verification link is emailed."""
    return await _render_page(request, "signup", "Sign up", signed_in=False)


@_page_route("/check-email", "Check your email")
async def check_email_page(request: web.Request) -> web.StreamResponse:
    """After sign-up: follow the link we sent; resend it."""
    return await _render_page(
        request, "check_email", "Check your email", signed_in=False
    )


@_page_route("/forgot-password", "Forgot your password")
async def forgot_password_page(request: web.Request) -> web.StreamResponse:
    """Asks for a password reset link (whoever forgot it is not signed in)."""
    return await _render_page(
        request, "forgot_password", "Forgot your password", signed_in=None
    )


@_page_route("/reset-password", "Choose a new password")
async def reset_password_page(request: web.Request) -> web.StreamResponse:
    """The page an emailed reset link opens (signed in or not)."""
    return await _render_page(
        request, "reset_password", "Choose a new password", signed_in=None
    )

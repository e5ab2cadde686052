"""Headers every answer gets: no sniffing, no caching of account data, CSP on pages."""

from __future__ import annotations

from aiohttp import web

# Pages run only their own scripts (no inline ones) and load nothing from
# elsewhere; inline styles are allowed (Swagger UI sets style attributes).
PAGE_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
# Answers under these paths carry account data, tokens or private images:
# no shared cache may keep them, unless a handler chose otherwise (the
# immutable PNG downloads say `private`).
PRIVATE_PREFIXES = ("/api/", "/v1/")


async def add_security_headers(
    request: web.Request, response: web.StreamResponse
) -> None:
    """An `on_response_prepare` hook: errors and static files included."""
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.path.startswith(PRIVATE_PREFIXES):
        headers.setdefault("Cache-Control", "no-store")
    if response.content_type == "text/html":
        # A page's own, stricter policy (the playground's) is kept.
        headers.setdefault("Content-Security-Policy", PAGE_POLICY)
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Referrer-Policy", "same-origin")

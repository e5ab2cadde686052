"""HTTP route tables, one module per area."""

from __future__ import annotations

from web.openapi import ApiRoutes


def route_tables() -> list[ApiRoutes]:
    """Every route table of the app, in documentation order."""
    from web.routes import (
        a1111,
        accounts,
        generations,
        openai,
        ops,
        pages,
        password_reset,
        status,
        tokens,
        verification,
        webhooks,
        ws,
    )

    return [
        accounts.routes,
        verification.routes,
        password_reset.routes,
        tokens.routes,
        generations.routes,
        webhooks.routes,
        ws.routes,
        openai.routes,
        a1111.routes,
        ops.routes,
        status.routes,
        pages.routes,
    ]

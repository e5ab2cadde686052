"""The account's webhook signing secret: read it, rotate it."""

from __future__ import annotations

from aiohttp import web

from sdapi.db.webhooks import AccountSecrets, account_secrets, rotate_secret
from web.appkeys import settings_key
from web.auth import Principal
from web.openapi import ApiRoutes, Response, json_response
from web.schemas.webhooks import WebhookSecret

routes = ApiRoutes(tags=["webhooks"])


def _public(found: AccountSecrets) -> WebhookSecret:
    return WebhookSecret(
        secret=found.secret, previous_expires_at=found.previous_expires_at
    )


@routes.route(
    "GET",
    "/api/v1/webhooks/secret",
    summary="Your webhook signing secret",
    responses=[Response(200, "The secret webhooks are signed with", WebhookSecret)],
)
async def get_webhook_secret(
    request: web.Request, *, principal: Principal
) -> web.StreamResponse:
    """Verify `webhook-signature` with it (Standard Webhooks)."""
    secret_key = request.app[settings_key].secret()
    return json_response(_public(await account_secrets(principal.user.id, secret_key)))


@routes.route(
    "POST",
    "/api/v1/webhooks/secret/rotate",
    summary="Replace your webhook signing secret",
    responses=[Response(200, "The new secret", WebhookSecret)],
)
async def rotate_webhook_secret(
    request: web.Request, *, principal: Principal
) -> web.StreamResponse:
    """For 24 hours both the new and the replaced secret sign every webhook
    (two signatures, space-separated), so receivers can switch over."""
    secret_key = request.app[settings_key].secret()
    return json_response(_public(await rotate_secret(principal.user.id, secret_key)))

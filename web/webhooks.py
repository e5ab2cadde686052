"""Webhooks on web's side: checking a request's URL, signing payload links."""

from __future__ import annotations

import logging

from aiohttp import web

from sdapi.db.webhooks import LinkSigner
from sdapi.infra.webhook_targets import TargetRefused, check_target
from web.appkeys import settings_key
from web.errors import Unavailable, field_error
from web.schemas.webhooks import WebhookRequest

log = logging.getLogger(__name__)

# Retry-After of a webhook host that did not resolve in time (seconds).
RESOLVE_RETRY_S = 5


async def check_webhook(app: web.Application, webhook: WebhookRequest | None) -> None:
    """422 for a URL we would not send to, 503 when its DNS is too slow."""
    if webhook is None:
        return
    settings = app[settings_key]
    try:
        await check_target(
            webhook.url,
            allow_private=settings.webhook_allow_private,
            timeout_s=settings.webhook_resolve_timeout,
        )
    except TargetRefused as refused:
        raise field_error("webhook.url", str(refused)) from None
    except TimeoutError:
        log.warning("webhook host of %s did not resolve in time", webhook.url)
        raise Unavailable(
            "The webhook URL's host did not resolve in time; try again shortly.",
            retry_after=RESOLVE_RETRY_S,
        ) from None


def links(app: web.Application) -> LinkSigner:
    """What signs the image URLs of this app's webhook payloads."""
    settings = app[settings_key]
    return LinkSigner(settings.secret(), settings.base_url)

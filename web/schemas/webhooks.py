"""Public models of webhooks: a request's webhook, its state, the secret."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from sdapi.contract.webhooks import DEFAULT_EVENTS, URL_MAX, WebhookEvent
from web.schemas.base import RequestModel


class WebhookRequest(RequestModel):
    """Where to POST a generation's events, signed (Standard Webhooks)."""

    url: str = Field(
        max_length=URL_MAX,
        description="http(s) URL; its host must resolve to public addresses.",
    )
    events: list[WebhookEvent] = Field(
        default=list(DEFAULT_EVENTS),
        min_length=1,
        max_length=len(WebhookEvent),
        description="started, image (one per image), completed (succeeded, "
        "failed or cancelled).",
        json_schema_extra={"uniqueItems": True},
    )

    @field_validator("events")
    @classmethod
    def _once_each(cls, value: list[WebhookEvent]) -> list[WebhookEvent]:
        if len(set(value)) != len(value):
            raise ValueError("An event is named twice.")
        return value


class WebhookState(BaseModel):
    """A generation's webhook, and how its latest event's delivery went."""

    url: str
    events: list[WebhookEvent]
    event: WebhookEvent | None = Field(description="The latest event written")
    status: Literal["pending", "sending", "delivered", "failed"] | None
    attempts: int
    delivered_at: datetime | None
    last_error: str | None


class WebhookSecret(BaseModel):
    """The account's webhook signing secret."""

    secret: str = Field(description="whsec_ and base64: the key to verify with")
    previous_expires_at: datetime | None = Field(
        description="Until then the secret a rotation replaced signs too"
    )

"""Webhook events: their names, and the limits both web and jobs enforce."""

from __future__ import annotations

from enum import StrEnum


class WebhookEvent(StrEnum):
    """What a generation's webhook may be told (`GenerationRequest.webhook`)."""

    STARTED = "started"  # a node began it
    IMAGE = "image"  # one image is stored (one event per image)
    COMPLETED = "completed"  # it ended: succeeded, failed or cancelled

    @property
    def type(self) -> str:
        """The event's `type` in the payload, e.g. `generation.completed`."""
        return f"generation.{self.value}"


DEFAULT_EVENTS = (WebhookEvent.COMPLETED,)
# Longest webhook URL accepted (characters).
URL_MAX = 2000
# Largest body POSTed; a payload over it is never sent (its row fails).
BODY_MAX_BYTES = 256 * 1024
# How much of a receiver's answer is read, for `last_error`.
ANSWER_READ_BYTES = 4096
# After a rotation the old secret keeps signing this long (seconds).
PREVIOUS_SECRET_TTL_S = 24 * 3600

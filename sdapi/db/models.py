"""The database schema (Tortoise models). `web` owns it; `jobs` imports it.

Importing this module starts nothing and needs no aiohttp app.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID

from tortoise import fields
from tortoise.indexes import Index
from tortoise.models import Model

from sdapi.contract.events import DoneEvent
from sdapi.contract.payloads import ErrorInfo
from sdapi.contract.status import Status, Tier

# Re-exported: the code that reads and writes the models takes its clock here.
from sdapi.infra.clock import utcnow as utcnow


def email_key_of(email: str) -> str:
    """How an address is looked up: addresses differ by more than case."""
    return email.lower()


class Delivery(StrEnum):
    DOWNLOAD = "download"
    EMAIL = "email"


class OutboxStatus(StrEnum):
    PENDING = "pending"  # waiting for its next attempt
    SENDING = "sending"  # claimed by a sender; stuck ones are retried
    SENT = "sent"
    FAILED = "failed"  # gave up after the last attempt


class TokenKind(StrEnum):
    BEARER = "bearer"  # Authorization: Bearer
    SESSION = "session"  # behind a playground session cookie


class User(Model):
    id = fields.UUIDField(primary_key=True)
    email = fields.CharField(max_length=320)
    # Lower-cased email: unique, so "A@x.org" and "a@x.org" are one account.
    email_key = fields.CharField(max_length=320, unique=True)
    name = fields.CharField(max_length=100, null=True)
    password_hash = fields.CharField(max_length=128)
    premium_until = fields.DatetimeField(null=True)
    email_verified_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    # Webhook signing secrets are derived from SDAPI_SECRET_KEY and these
    # random ids (sdapi.db.webhooks): the table alone does not reveal them.
    webhook_key_id = fields.CharField(max_length=64, null=True)
    # The id the last rotation replaced; it signs too until rotated_at + 24 h.
    webhook_previous_key_id = fields.CharField(max_length=64, null=True)
    webhook_rotated_at = fields.DatetimeField(null=True)
    # The model used when a request names none (set through A1111's options
    # endpoint); None, or one no longer known: the service's default.
    default_model = fields.CharField(max_length=200, null=True)

    class Meta:
        table = "users"

    def tier_at(self, now: datetime) -> Tier:
        """Premium while premium time is left."""
        if self.premium_until is not None and self.premium_until > now:
            return Tier.PREMIUM
        return Tier.NORMAL


class ApiToken(Model):
    """A bearer token or session; only the SHA-256 of the secret is stored."""

    id = fields.UUIDField(primary_key=True)
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "models.User", related_name="tokens", on_delete=fields.CASCADE
    )
    kind = fields.CharEnumField(TokenKind, max_length=16, default=TokenKind.BEARER)
    token_hash = fields.CharField(max_length=64, unique=True)
    # What the user called a personal API token ("" for sign-in tokens).
    name = fields.CharField(max_length=100, default="")
    created_at = fields.DatetimeField(auto_now_add=True)
    expires_at = fields.DatetimeField()
    revoked_at = fields.DatetimeField(null=True)
    # Updated at most once a minute per token (see web.tokens.note_use).
    last_used_at = fields.DatetimeField(null=True)

    class Meta:
        table = "api_tokens"


class LinkPurpose(StrEnum):
    """What an emailed single-use link does when it is opened."""

    VERIFY = "verify"  # proves an address (the account's own, or a new one)
    RESET = "reset"  # sets a new password


class EmailLink(Model):
    """A single-use, expiring link sent by email; only its SHA-256 is kept.

    Verifications and password resets are the same thing with another
    purpose: a token that proves control of an address, once, for a while.
    """

    id = fields.UUIDField(primary_key=True)
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "models.User", related_name="email_links", on_delete=fields.CASCADE
    )
    purpose = fields.CharEnumField(LinkPurpose, max_length=16)
    token_hash = fields.CharField(max_length=64, unique=True)
    # A new address a verification proves (an email change); None: the
    # account's own address.
    email = fields.CharField(max_length=320, null=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    expires_at = fields.DatetimeField()
    used_at = fields.DatetimeField(null=True)

    class Meta:
        table = "email_links"


class PremiumCode(Model):
    """A single-use code worth `days` of premium; only its SHA-256 is stored."""

    id = fields.UUIDField(primary_key=True)
    code_hash = fields.CharField(max_length=64, unique=True)
    days = fields.IntField()
    created_at = fields.DatetimeField(auto_now_add=True)
    redeemed_by: fields.ForeignKeyNullableRelation[User] = fields.ForeignKeyField(
        "models.User",
        related_name="redeemed_codes",
        null=True,
        on_delete=fields.SET_NULL,
    )
    redeemed_at = fields.DatetimeField(null=True)

    class Meta:
        table = "premium_codes"


class Generation(Model):
    """One request for images, from acceptance to its terminal status."""

    id = fields.UUIDField(primary_key=True)
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "models.User", related_name="generations", on_delete=fields.CASCADE
    )
    # The column behind `user`, which Tortoise sets without loading the user.
    user_id: UUID
    tier = fields.CharEnumField(Tier, max_length=16)
    status = fields.CharEnumField(Status, max_length=16)
    delivery = fields.CharEnumField(Delivery, max_length=16)
    model = fields.CharField(max_length=200)
    # The public GenerationRequest as accepted, with the seed actually used.
    request: Any = fields.JSONField()
    # Copied out of `request` so the dispatcher can group batches in SQL.
    width = fields.IntField()
    height = fields.IntField()
    steps = fields.IntField()
    guidance_scale = fields.FloatField()
    scheduler = fields.CharField(max_length=32)
    num_images = fields.IntField()
    created_at = fields.DatetimeField(auto_now_add=True)
    scheduled_for = fields.DatetimeField(null=True)
    queued_at = fields.DatetimeField(null=True)
    started_at = fields.DatetimeField(null=True)
    finished_at = fields.DatetimeField(null=True)
    # When queued/running work is presumed lost and the reconciler steps in.
    deadline = fields.DatetimeField(null=True)
    batch_id = fields.UUIDField(null=True)
    attempts = fields.IntField(default=0)
    error_code = fields.CharField(max_length=64, null=True)
    error_message = fields.TextField(null=True)
    # Notices for the user about the finished generation (Notice).
    warnings: Any = fields.JSONField(default=list)
    emailed_at = fields.DatetimeField(null=True)
    # Where its webhook events go, and which (WebhookEvent values); no URL:
    # none are sent.
    webhook_url = fields.CharField(max_length=2000, null=True)
    webhook_events: Any = fields.JSONField(default=list)

    images: fields.ReverseRelation[GeneratedImage]

    def done_event(self) -> DoneEvent | None:
        """The `done` event of a finished generation; None while it runs."""
        status = Status(self.status)
        if not status.is_terminal:
            return None
        error = None
        if status is Status.FAILED:
            error = ErrorInfo(
                code=self.error_code or "failed",
                message=self.error_message or "The generation failed.",
            )
        return DoneEvent(status=status, error=error)

    class Meta:
        table = "generations"
        indexes = (
            Index(fields=("status", "scheduled_for")),
            Index(fields=("user_id", "created_at")),
            Index(fields=("batch_id",)),
        )


class GeneratedImage(Model):
    id = fields.UUIDField(primary_key=True)
    generation: fields.ForeignKeyRelation[Generation] = fields.ForeignKeyField(
        "models.Generation", related_name="images", on_delete=fields.CASCADE
    )
    index = fields.IntField()
    seed = fields.BigIntField()
    width = fields.IntField()
    height = fields.IntField()
    sha256 = fields.CharField(max_length=64)
    # The PNG is in the image store at `store` (a canonical SDAPI_STORAGE_URL)
    # under `object_key`; deleting the row queues the object's deletion (a
    # trigger, migration 0009), whatever deletes it.
    store = fields.CharField(max_length=500)
    object_key = fields.CharField(max_length=300)
    size = fields.IntField()
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "generated_images"
        unique_together = (("generation", "index"),)
        indexes = (Index(fields=("object_key",)),)


class InputRole(StrEnum):
    INIT_IMAGE = "init_image"
    MASK = "mask"


class InputImage(Model):
    """An uploaded input (cleaned PNG), stored once per user and content.

    Never served back over the API: it only travels to GPU nodes (by hash,
    through Redis), so one user's upload cannot reach another user.
    """

    id = fields.UUIDField(primary_key=True)
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "models.User", related_name="input_images", on_delete=fields.CASCADE
    )
    sha256 = fields.CharField(max_length=64)
    # In the image store, as for GeneratedImage.
    store = fields.CharField(max_length=500)
    object_key = fields.CharField(max_length=300)
    size = fields.IntField()
    width = fields.IntField()
    height = fields.IntField()
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "input_images"
        unique_together = (("user", "sha256"),)
        indexes = (Index(fields=("object_key",)),)


class GenerationInput(Model):
    """Which stored input a generation uses, and as what."""

    id = fields.UUIDField(primary_key=True)
    generation: fields.ForeignKeyRelation[Generation] = fields.ForeignKeyField(
        "models.Generation", related_name="inputs", on_delete=fields.CASCADE
    )
    # An `InputRole` value (a plain column: the migration imports no enum).
    role = fields.CharField(max_length=16)
    image: fields.ForeignKeyRelation[InputImage] = fields.ForeignKeyField(
        "models.InputImage", related_name="uses", on_delete=fields.CASCADE
    )

    class Meta:
        table = "generation_inputs"
        unique_together = (("generation", "role"),)


# How long an `Idempotency-Key` answers with its first generation (24 h, as the
# API promises); `jobs`' clean-up deletes older keys.
IDEMPOTENCY_KEY_TTL = timedelta(hours=24)


class IdempotencyKey(Model):
    """A submit made with an `Idempotency-Key`: retries get its generation."""

    id = fields.UUIDField(primary_key=True)
    user: fields.ForeignKeyRelation[User] = fields.ForeignKeyField(
        "models.User", related_name="idempotency_keys", on_delete=fields.CASCADE
    )
    # SHA-256 of the client's key (scoped by route) and of the request body.
    key_hash = fields.CharField(max_length=64)
    body_hash = fields.CharField(max_length=64)
    generation: fields.ForeignKeyRelation[Generation] = fields.ForeignKeyField(
        "models.Generation", related_name="idempotency_keys", on_delete=fields.CASCADE
    )
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "idempotency_keys"
        unique_together = (("user", "key_hash"),)


class OutboxEmail(Model):
    """An email to send; `dedupe_key` makes writing it idempotent."""

    id = fields.UUIDField(primary_key=True)
    dedupe_key = fields.CharField(max_length=200, unique=True)
    to_address = fields.CharField(max_length=320)
    subject = fields.CharField(max_length=300)
    text_body = fields.TextField()
    html_body = fields.TextField(null=True)
    # Its images are attached when the email is built.
    generation: fields.ForeignKeyNullableRelation[Generation] = fields.ForeignKeyField(
        "models.Generation", related_name="emails", null=True, on_delete=fields.CASCADE
    )
    status = fields.CharEnumField(
        OutboxStatus, max_length=16, default=OutboxStatus.PENDING
    )
    attempts = fields.IntField(default=0)
    last_error = fields.TextField(null=True)
    next_attempt_at = fields.DatetimeField(default=utcnow)
    claimed_at = fields.DatetimeField(null=True)
    sent_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "outbox_emails"
        indexes = (Index(fields=("status", "next_attempt_at")),)


class WebhookDelivery(Model):
    """One webhook event to POST; `id` is its `webhook-id`, the same on retries.

    The body is built when the event happens (what was true then), in the
    transaction that makes it true; `dedupe_key` makes writing it idempotent.
    """

    id = fields.UUIDField(primary_key=True)
    generation: fields.ForeignKeyRelation[Generation] = fields.ForeignKeyField(
        "models.Generation", related_name="webhook_deliveries", on_delete=fields.CASCADE
    )
    # A WebhookEvent value (a plain column: the migration imports no enum).
    event = fields.CharField(max_length=16)
    dedupe_key = fields.CharField(max_length=200, unique=True)
    url = fields.CharField(max_length=2000)
    body = fields.TextField()
    status = fields.CharEnumField(
        OutboxStatus, max_length=16, default=OutboxStatus.PENDING
    )
    attempts = fields.IntField(default=0)
    last_error = fields.TextField(null=True)
    next_attempt_at = fields.DatetimeField(default=utcnow)
    claimed_at = fields.DatetimeField(null=True)
    delivered_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "webhook_deliveries"
        indexes = (
            Index(fields=("status", "next_attempt_at")),
            Index(fields=("generation_id", "created_at")),
        )


class ImageBlob(Model):
    """An image's bytes in the `postgres` store (the embedded default)."""

    key = fields.CharField(max_length=300, primary_key=True)
    data = fields.BinaryField()
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "image_blobs"


class StorageDeletion(Model):
    """An object to delete from a store, retried until it is gone.

    Written by a trigger when an image row is deleted (purge, clean-up, an
    account deleted), by `sdapi storage migrate` for the copy it moved away
    from (`not_before` past any download in flight), and before each object
    written (a day ahead) so a write whose row never commits is not left
    behind. The sender deletes an object only while no row names it.
    """

    id = fields.BigIntField(primary_key=True)
    store = fields.CharField(max_length=500)
    object_key = fields.CharField(max_length=300)
    not_before = fields.DatetimeField(default=utcnow)
    attempts = fields.IntField(default=0)
    last_error = fields.TextField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "storage_deletions"
        indexes = (Index(fields=("not_before",)),)

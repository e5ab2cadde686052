"""Webhooks: the deliveries outbox, a generation's webhook, an account's key ids."""

import functools
from json import dumps, loads
from uuid import uuid4

from tortoise import fields, migrations
from tortoise.fields.base import OnDelete
from tortoise.indexes import Index
from tortoise.migrations import operations as ops

from sdapi.db.models import OutboxStatus, utcnow


class Migration(migrations.Migration):
    dependencies = [("models", "0006_email_links")]

    initial = False

    operations = [
        ops.CreateModel(
            name="WebhookDelivery",
            fields=[
                ("id", fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ("generation", fields.ForeignKeyField("models.Generation", source_field="generation_id", db_constraint=True, to_field="id", related_name="webhook_deliveries", on_delete=OnDelete.CASCADE)),
                ("event", fields.CharField(max_length=16)),
                ("dedupe_key", fields.CharField(unique=True, max_length=200)),
                ("url", fields.CharField(max_length=2000)),
                ("body", fields.TextField(unique=False)),
                ("status", fields.CharEnumField(default=OutboxStatus.PENDING, description="PENDING: pending\nSENDING: sending\nSENT: sent\nFAILED: failed", enum_type=OutboxStatus, max_length=16)),
                ("attempts", fields.IntField(default=0)),
                ("last_error", fields.TextField(null=True, unique=False)),
                ("next_attempt_at", fields.DatetimeField(default=utcnow, auto_now=False, auto_now_add=False)),
                ("claimed_at", fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ("delivered_at", fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={"table": "webhook_deliveries", "app": "models", "indexes": [Index(fields=["status", "next_attempt_at"]), Index(fields=["generation_id", "created_at"])], "pk_attr": "id", "table_description": "One webhook event to POST; `id` is its `webhook-id`, the same on retries."},
            bases=["Model"],
        ),
        ops.AddField(
            model_name="Generation",
            name="webhook_events",
            field=fields.JSONField(default=list, encoder=functools.partial(dumps, separators=(",", ":")), decoder=loads),
        ),
        ops.AddField(
            model_name="Generation",
            name="webhook_url",
            field=fields.CharField(null=True, max_length=2000),
        ),
        ops.AddField(
            model_name="User",
            name="webhook_key_id",
            field=fields.CharField(null=True, max_length=64),
        ),
        ops.AddField(
            model_name="User",
            name="webhook_previous_key_id",
            field=fields.CharField(null=True, max_length=64),
        ),
        ops.AddField(
            model_name="User",
            name="webhook_rotated_at",
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
    ]

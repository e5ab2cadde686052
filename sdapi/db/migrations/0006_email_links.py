"""Verifications and password resets in one table of emailed single-use links."""

from uuid import uuid4

from tortoise import fields, migrations
from tortoise.fields.base import OnDelete
from tortoise.migrations import operations as ops

from sdapi.db.models import LinkPurpose

# Links in flight survive the move: a verification or reset emailed before the
# upgrade still works after it.
_COPY = """
INSERT INTO email_links
    (id, user_id, purpose, token_hash, email, created_at, expires_at, used_at)
SELECT id, user_id, 'verify', token_hash, email, created_at, expires_at, used_at
FROM email_verifications;
INSERT INTO email_links
    (id, user_id, purpose, token_hash, email, created_at, expires_at, used_at)
SELECT id, user_id, 'reset', token_hash, NULL, created_at, expires_at, used_at
FROM password_resets;
"""


class Migration(migrations.Migration):
    dependencies = [("models", "0005_email_changes")]

    initial = False

    operations = [
        ops.CreateModel(
            name="EmailLink",
            fields=[
                ("id", fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ("user", fields.ForeignKeyField("models.User", source_field="user_id", db_constraint=True, to_field="id", related_name="email_links", on_delete=OnDelete.CASCADE)),
                ("purpose", fields.CharEnumField(description="VERIFY: verify\nRESET: reset", enum_type=LinkPurpose, max_length=16)),
                ("token_hash", fields.CharField(unique=True, max_length=64)),
                ("email", fields.CharField(null=True, max_length=320)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ("expires_at", fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ("used_at", fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={"table": "email_links", "app": "models", "pk_attr": "id", "table_description": "A single-use, expiring link sent by email; only its SHA-256 is kept."},
            bases=["Model"],
        ),
        ops.RunSQL(_COPY),
        ops.DeleteModel(name="EmailVerification"),
        ops.DeleteModel(name="PasswordReset"),
    ]

"""Input images of img2img / inpainting, and idempotent submits."""

from uuid import uuid4

from tortoise import fields, migrations
from tortoise.fields.base import OnDelete
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("models", "0001_initial")]

    operations = [
        ops.CreateModel(
            name="InputImage",
            fields=[
                ("id", fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ("user", fields.ForeignKeyField("models.User", source_field="user_id", db_constraint=True, to_field="id", related_name="input_images", on_delete=OnDelete.CASCADE)),
                ("sha256", fields.CharField(max_length=64)),
                ("data", fields.BinaryField()),
                ("width", fields.IntField()),
                ("height", fields.IntField()),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={"table": "input_images", "app": "models", "unique_together": (("user", "sha256"),), "pk_attr": "id", "table_description": "An uploaded input (cleaned PNG), stored once per user and content."},
            bases=["Model"],
        ),
        ops.CreateModel(
            name="GenerationInput",
            fields=[
                ("id", fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ("generation", fields.ForeignKeyField("models.Generation", source_field="generation_id", db_constraint=True, to_field="id", related_name="inputs", on_delete=OnDelete.CASCADE)),
                ("role", fields.CharField(max_length=16)),
                ("image", fields.ForeignKeyField("models.InputImage", source_field="image_id", db_constraint=True, to_field="id", related_name="uses", on_delete=OnDelete.CASCADE)),
            ],
            options={"table": "generation_inputs", "app": "models", "unique_together": (("generation", "role"),), "pk_attr": "id", "table_description": "Which stored input a generation uses, and as what."},
            bases=["Model"],
        ),
        ops.CreateModel(
            name="IdempotencyKey",
            fields=[
                ("id", fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ("user", fields.ForeignKeyField("models.User", source_field="user_id", db_constraint=True, to_field="id", related_name="idempotency_keys", on_delete=OnDelete.CASCADE)),
                ("key_hash", fields.CharField(max_length=64)),
                ("body_hash", fields.CharField(max_length=64)),
                ("generation", fields.ForeignKeyField("models.Generation", source_field="generation_id", db_constraint=True, to_field="id", related_name="idempotency_keys", on_delete=OnDelete.CASCADE)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={"table": "idempotency_keys", "app": "models", "unique_together": (("user", "key_hash"),), "pk_attr": "id", "table_description": "A submit made with an `Idempotency-Key`: retries get its generation."},
            bases=["Model"],
        ),
    ]

"""Each user's own default model (A1111's `sd_model_checkpoint` option)."""

from tortoise import fields, migrations
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("models", "0007_webhooks")]

    initial = False

    operations = [
        ops.AddField(
            model_name="User",
            name="default_model",
            field=fields.CharField(null=True, max_length=200),
        ),
    ]

"""Personal API tokens: a name, and when each was last used."""

from tortoise import fields, migrations
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("models", "0002_inputs")]

    initial = False

    operations = [
        ops.AddField(
            model_name="ApiToken",
            name="last_used_at",
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddField(
            model_name="ApiToken",
            name="name",
            field=fields.CharField(default="", max_length=100),
        ),
    ]

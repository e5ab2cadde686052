"""Email changes: the address a verification link proves, when not the account's."""

from tortoise import fields, migrations
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("models", "0004_password_resets")]

    initial = False

    operations = [
        ops.AddField(
            model_name="EmailVerification",
            name="email",
            field=fields.CharField(null=True, max_length=320),
        ),
    ]

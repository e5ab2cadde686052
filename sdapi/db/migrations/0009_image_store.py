"""Image bytes move out of their rows into an image store (`image_blobs` for
the `postgres` store); rows keep where their bytes are, and deleting a row
queues its object's deletion, whatever deletes it."""

from tortoise import fields, migrations
from tortoise.indexes import Index
from tortoise.migrations import operations as ops

from sdapi.infra.clock import utcnow

# Existing images stay in the database: the `postgres` store, under the keys
# of sdapi.infra.object_store (result_object_key, input_object_key).
_MOVE = """
UPDATE generated_images
SET store = 'postgres',
    object_key = 'results/' || generation_id || '/' || index || '.png',
    size = octet_length(png);
INSERT INTO image_blobs (key, data, created_at)
SELECT object_key, png, created_at FROM generated_images;
UPDATE input_images
SET store = 'postgres',
    object_key = 'inputs/' || user_id || '/' || id || '.png',
    size = octet_length(data);
INSERT INTO image_blobs (key, data, created_at)
SELECT object_key, data, created_at FROM input_images;
"""

# A trigger, not the code: purges, the clean-up and cascades from a deleted
# account or generation all delete rows, and none may leave an object behind.
# The database's own blobs go in the same transaction; other stores' objects
# are queued for jobs' deleter (retried until they are gone).
_TRIGGER = """
CREATE FUNCTION sdapi_image_row_deleted() RETURNS trigger AS $$
BEGIN
    IF OLD.store = 'postgres' THEN
        DELETE FROM image_blobs WHERE key = OLD.object_key;
    ELSE
        INSERT INTO storage_deletions
            (store, object_key, not_before, attempts, created_at)
        VALUES (OLD.store, OLD.object_key, now(), 0, now());
    END IF;
    RETURN OLD;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER generated_images_deleted AFTER DELETE ON generated_images
    FOR EACH ROW EXECUTE FUNCTION sdapi_image_row_deleted();
CREATE TRIGGER input_images_deleted AFTER DELETE ON input_images
    FOR EACH ROW EXECUTE FUNCTION sdapi_image_row_deleted();
"""

_UNTRIGGER = """
DROP TRIGGER IF EXISTS input_images_deleted ON input_images;
DROP TRIGGER IF EXISTS generated_images_deleted ON generated_images;
DROP FUNCTION IF EXISTS sdapi_image_row_deleted();
"""


def _columns(model_name: str, *, null: bool) -> list[ops.Operation]:
    make = ops.AddField if null else ops.AlterField
    return [
        make(
            model_name=model_name,
            name="store",
            field=fields.CharField(max_length=500, null=null),
        ),
        make(
            model_name=model_name,
            name="object_key",
            field=fields.CharField(max_length=300, null=null),
        ),
        make(model_name=model_name, name="size", field=fields.IntField(null=null)),
    ]


class Migration(migrations.Migration):
    dependencies = [("models", "0008_default_model")]

    initial = False

    operations = [
        ops.CreateModel(
            name="ImageBlob",
            fields=[
                ("key", fields.CharField(primary_key=True, unique=True, db_index=True, max_length=300)),
                ("data", fields.BinaryField()),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={"table": "image_blobs", "app": "models", "pk_attr": "key", "table_description": "An image's bytes in the `postgres` store (the embedded default)."},
            bases=["Model"],
        ),
        ops.CreateModel(
            name="StorageDeletion",
            fields=[
                ("id", fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ("store", fields.CharField(max_length=500)),
                ("object_key", fields.CharField(max_length=300)),
                ("not_before", fields.DatetimeField(default=utcnow, auto_now=False, auto_now_add=False)),
                ("attempts", fields.IntField(default=0)),
                ("last_error", fields.TextField(null=True, unique=False)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={"table": "storage_deletions", "app": "models", "indexes": [Index(fields=["not_before"])], "pk_attr": "id", "table_description": "An object to delete from a store, retried until it is gone."},
            bases=["Model"],
        ),
        *_columns("GeneratedImage", null=True),
        *_columns("InputImage", null=True),
        ops.RunSQL(_MOVE),
        *_columns("GeneratedImage", null=False),
        *_columns("InputImage", null=False),
        ops.RemoveField(model_name="GeneratedImage", name="png"),
        ops.RemoveField(model_name="InputImage", name="data"),
        ops.AddIndex(model_name="GeneratedImage", index=Index(fields=["object_key"])),
        ops.AddIndex(model_name="InputImage", index=Index(fields=["object_key"])),
        ops.RunSQL(_TRIGGER, reverse_sql=_UNTRIGGER),
    ]

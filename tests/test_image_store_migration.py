"""Migration 0009 on an installation with images: a database at 0008 with
PNG bytes in its rows comes out with the bytes in the `postgres` store
(`image_blobs`), readable through the image store under the keys new images
get, and deleting a row takes its bytes (or queues its object) with it."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from tortoise import Tortoise
from tortoise.migrations.api import migrate

from sdapi.db.connection import apply_migrations, open_database, tortoise_config
from sdapi.db.image_store import ImageStores
from sdapi.db.models import GeneratedImage, ImageBlob, InputImage, StorageDeletion
from sdapi.infra.object_store import input_object_key, result_object_key
from tests.conftest import _admin, _with_database
from tests.jobs.test_results import asyncpg_params


@pytest.fixture
async def scratch_url(postgres_server_url: str) -> AsyncIterator[str]:
    """A new database of its own, migrated up to 0008 only."""
    name = f"sdapi_migration_{uuid.uuid4().hex[:8]}"
    await _admin(postgres_server_url, f'CREATE DATABASE "{name}"')
    url = _with_database(postgres_server_url, name)
    try:
        await migrate(
            config=tortoise_config(url, pool_size=1),
            target="models.0008_default_model",
        )
        await Tortoise.close_connections()
        yield url
    finally:
        with contextlib.suppress(Exception):
            await _admin(postgres_server_url, f'DROP DATABASE "{name}" WITH (FORCE)')


async def test_existing_bytes_move_into_the_postgres_store(scratch_url: str) -> None:
    user_id, generation_id, input_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    pngs = [b"\x89PNG first" + bytes(range(256)) * 40, b"\x89PNG second"]
    upload = b"\x89PNG an upload"
    conn = await asyncpg.connect(**asyncpg_params(scratch_url))
    try:
        await conn.execute(
            "INSERT INTO users (id, email, email_key, password_hash, created_at) "
            "VALUES ($1, 'old@example.org', 'old@example.org', 'x', now())",
            user_id,
        )
        await conn.execute(
            "INSERT INTO generations (id, tier, status, delivery, model, request, "
            "width, height, steps, guidance_scale, scheduler, num_images, "
            "created_at, attempts, warnings, user_id, webhook_events) VALUES "
            "($1, 'premium', 'succeeded', 'download', 'tiny', $2, 64, 64, 4, 7.0, "
            "'euler', 2, now(), 1, '[]', $3, '[]')",
            generation_id,
            json.dumps({"prompt": "old"}),
            user_id,
        )
        for index, png in enumerate(pngs):
            await conn.execute(
                "INSERT INTO generated_images (id, index, seed, width, height, "
                "sha256, png, created_at, generation_id) "
                "VALUES ($1, $2, 1, 64, 64, 'h', $3, now(), $4)",
                uuid.uuid4(),
                index,
                png,
                generation_id,
            )
        await conn.execute(
            "INSERT INTO input_images (id, sha256, data, width, height, created_at, "
            "user_id) VALUES ($1, 'i', $2, 64, 64, now(), $3)",
            input_id,
            upload,
            user_id,
        )
        await conn.execute(
            "INSERT INTO generation_inputs (id, role, generation_id, image_id) "
            "VALUES ($1, 'init_image', $2, $3)",
            uuid.uuid4(),
            generation_id,
            input_id,
        )
    finally:
        await conn.close()

    assert await apply_migrations(scratch_url) == ["models.0009_image_store"]

    async with open_database(scratch_url, pool_size=1):
        stores = ImageStores("postgres", timeout_s=10)
        rows = await GeneratedImage.filter(generation_id=generation_id).order_by(
            "index"
        )
        assert [(row.store, row.object_key, row.size) for row in rows] == [
            ("postgres", result_object_key(generation_id, index), len(png))
            for index, png in enumerate(pngs)
        ]
        assert [await stores.read(r.store, r.object_key) for r in rows] == pngs
        [image] = await InputImage.filter(id=input_id)
        assert (image.store, image.object_key, image.size) == (
            "postgres",
            input_object_key(user_id, input_id),
            len(upload),
        )
        assert await stores.read(image.store, image.object_key) == upload

        # The trigger: a deleted row takes its blob along in the postgres
        # store, and queues its object's deletion in any other.
        elsewhere = "s3://bucket/images/"
        await GeneratedImage.filter(generation_id=generation_id, index=1).update(
            store=elsewhere
        )
        assert await ImageBlob.all().count() == 3
        await GeneratedImage.filter(generation_id=generation_id).delete()
        # Index 0's blob went with it; index 1's row named another store.
        assert sorted(await ImageBlob.all().values_list("key", flat=True)) == sorted(
            [result_object_key(generation_id, 1), input_object_key(user_id, input_id)]
        )
        [queued] = await StorageDeletion.all()
        assert (queued.store, queued.object_key) == (
            elsewhere,
            result_object_key(generation_id, 1),
        )
        await stores.close()

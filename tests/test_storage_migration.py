"""`sdapi storage migrate`: a populated database moves to S3 and back, every
object checked by hash, an interrupted run resumed, nothing left behind."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import Counter
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from tortoise.transactions import in_transaction

from jobs.storage_deleter import DeletionReport, delete_queued_objects
from sdapi.contract.status import Status
from sdapi.db.connection import model_connection, open_database
from sdapi.db.image_store import ImageStores
from sdapi.db.models import (
    GeneratedImage,
    ImageBlob,
    InputImage,
    StorageDeletion,
    utcnow,
)
from sdapi.devtools.accounts import make_user
from sdapi.infra.object_store import parse_store_url, sha256_hex
from sdapi.storage_migration import MigrationReport, StorageMover
from tests.image_support import image_bytes, stored_input, stored_result
from tests.jobs.conftest import make_generation
from tests.s3_server import MotoServer
from tests.support import until
from tests.test_operator import sdapi

PRESIGN_S = 300


@pytest.fixture
async def database(clean_db: str) -> AsyncIterator[str]:
    async with open_database(clean_db):
        yield clean_db


async def _populate(images: ImageStores, *, users: int = 3) -> dict[str, str]:
    """Results and inputs of several users; each object's key and hash."""
    for _ in range(users):
        user = (await make_user()).user
        for _ in range(2):
            generation = await make_generation(user, status=Status.SUCCEEDED)
            for index in range(2):
                await stored_result(images, generation, index, image_bytes())
        for _ in range(2):
            await stored_input(images, user, image_bytes())
    return await _hashes()


async def _hashes() -> dict[str, str]:
    rows = [
        *await GeneratedImage.all().values_list("object_key", "sha256"),
        *await InputImage.all().values_list("object_key", "sha256"),
    ]
    return dict(rows)


async def _every_image_reads_back(images: ImageStores) -> Counter[str]:
    """Read every image where its row says it is (as downloads do), check
    its hash; how many are in each store."""
    stores: Counter[str] = Counter()
    for table in (GeneratedImage, InputImage):
        for store, key, sha256 in await table.all().values_list(
            "store", "object_key", "sha256"
        ):
            assert sha256_hex(await images.read(store, key)) == sha256, key
            stores[store] += 1
    return stores


def _bucket_hashes(server: MotoServer, bucket: str) -> dict[str, str]:
    client = server.client()
    return {
        key.removeprefix("images/"): hashlib.sha256(
            client.get_object(Bucket=bucket, Key=key)["Body"].read()
        ).hexdigest()
        for key in server.keys(bucket)
    }


async def _blob_hashes() -> dict[str, str]:
    return {
        key: sha256_hex(bytes(data))
        for key, data in await ImageBlob.all().values_list("key", "data")
    }


async def _deletions_run(images: ImageStores) -> DeletionReport:
    """Jobs' deleter, once every queued deletion is due (a day on)."""
    await StorageDeletion.all().update(not_before=utcnow() - timedelta(seconds=1))
    report = await delete_queued_objects(images, backoff_base=1, backoff_max=1)
    assert report.failed == 0
    assert await StorageDeletion.all().count() == 0
    return report


def _mover(images: ImageStores, lines: list[str] | None = None) -> StorageMover:
    return StorageMover(
        images,
        presign_s=PRESIGN_S,
        batch_size=4,
        progress=(lines if lines is not None else []).append,
    )


async def _waits_on_a_lock(statement: str) -> bool:
    rows = await model_connection(StorageDeletion).execute_query_dict(
        "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE $1",
        [f"{statement}%"],
    )
    return bool(rows[0]["n"])


@contextlib.asynccontextmanager
async def _row_locked(
    row_id: object, *, delete_it: bool = False
) -> AsyncIterator[asyncio.Event]:
    """Hold an image row's lock (as a concurrent purge does) until the event
    is set; then delete the row, or let it go."""
    locked, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with in_transaction():
            await GeneratedImage.select_for_update().filter(id=row_id).first()
            locked.set()
            await release.wait()
            if delete_it:
                await GeneratedImage.filter(id=row_id).delete()

    holder = asyncio.create_task(hold())
    await until(locked.wait, what="the row lock")
    try:
        yield release
    finally:
        release.set()
        await holder


async def test_a_populated_database_moves_to_s3_and_back(
    database: str, s3_url: str, s3_server: MotoServer, tmp_path: Path
) -> None:
    postgres = ImageStores("postgres", timeout_s=5)
    expected = await _populate(postgres)
    assert len(expected) == 18
    s3 = parse_store_url(s3_url)
    to_s3 = ImageStores(s3_url, timeout_s=5)
    try:
        # Interrupted: the run is stopped while a purge holds a row it is
        # switching (so at a known point; any point leaves rows consistent).
        results = await GeneratedImage.all().order_by("id").values_list("id", flat=True)
        lines: list[str] = []
        async with _row_locked(results[5]):
            run = asyncio.create_task(_mover(to_s3, lines).run())
            await until(
                lambda: _waits_on_a_lock('UPDATE "generated_images"'),
                what="the migration to wait on the locked row",
            )
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
        assert lines[0] == (
            f"18 image(s) to move to {s3.location} (12 results, 6 inputs)"
        )
        part = await _every_image_reads_back(to_s3)
        assert 4 <= part[s3.location] < 12
        assert part["postgres"] == 18 - part[s3.location]

        report = await _mover(to_s3).run()
        assert report == MigrationReport(
            target=s3.location,
            moved={"results": 12 - part[s3.location], "inputs": 6},
        )
        assert await _every_image_reads_back(to_s3) == {s3.location: 18}
        assert _bucket_hashes(s3_server, s3.bucket) == expected
        again = await _mover(to_s3).run()
        assert (again.total_moved, again.failures) == (0, [])

        # The old copies stay while a download that began before the move
        # may still read them.
        assert await _blob_hashes() == expected
        # (The rest are the first writes' own, a day ahead.)
        old = await StorageDeletion.filter(
            store="postgres", not_before__lt=utcnow() + timedelta(hours=1)
        )
        assert len(old) == 18
        assert all(
            row.not_before > utcnow() + timedelta(seconds=PRESIGN_S) for row in old
        )
        await _deletions_run(to_s3)
        assert await ImageBlob.all().count() == 0
        assert _bucket_hashes(s3_server, s3.bucket) == expected

        # And back, as an operator runs it.
        back = await asyncio.to_thread(
            sdapi,
            "storage",
            "migrate",
            "--to",
            "postgres",
            "--batch-size",
            "5",
            env={"SDAPI_DATABASE_URL": database, "SDAPI_DATA_DIR": str(tmp_path)},
            cwd=tmp_path,
        )
        assert back.returncode == 0, back.stderr
        assert "moved 18 image(s) to postgres (12 results, 6 inputs)" in back.stderr
        assert "every image is in postgres" in back.stderr
        assert back.stdout == ""
        assert await _every_image_reads_back(postgres) == {"postgres": 18}
        assert await _blob_hashes() == expected
        assert len(s3_server.keys(s3.bucket)) == 18
        await _deletions_run(to_s3)
        assert s3_server.keys(s3.bucket) == []
        assert await _blob_hashes() == expected
    finally:
        await to_s3.close()


async def test_a_row_deleted_while_it_moves_leaves_nothing_behind(
    database: str, s3_url: str, s3_server: MotoServer
) -> None:
    postgres = ImageStores("postgres", timeout_s=5)
    user = (await make_user()).user
    generation = await make_generation(user, status=Status.SUCCEEDED)
    purged = await stored_result(postgres, generation, 0, image_bytes())
    kept = await stored_input(postgres, user, image_bytes())
    s3 = parse_store_url(s3_url)
    to_s3 = ImageStores(s3_url, timeout_s=5)
    try:
        async with _row_locked(purged.id, delete_it=True) as release:
            run = asyncio.create_task(_mover(to_s3).run())
            await until(
                lambda: _waits_on_a_lock('UPDATE "generated_images"'),
                what="the migration to wait on the locked row",
            )
            # Copied already; its row goes before it can switch.
            assert f"images/{purged.object_key}" in s3_server.keys(s3.bucket)
            release.set()
            report = await run
        assert report.moved == {"results": 0, "inputs": 1}
        assert (report.gone, report.failures) == (1, [])
        await _deletions_run(to_s3)
        assert s3_server.keys(s3.bucket) == [f"images/{kept.object_key}"]
        assert await ImageBlob.all().count() == 0
        assert await _every_image_reads_back(to_s3) == {s3.location: 1}
    finally:
        await to_s3.close()


async def test_a_damaged_image_is_reported_and_left_where_it_is(
    database: str, tmp_path: Path
) -> None:
    postgres = ImageStores("postgres", timeout_s=5)
    expected = await _populate(postgres, users=1)
    damaged = sorted(expected)[0]
    await ImageBlob.filter(key=damaged).update(data=b"not what was stored")
    env = {"SDAPI_DATABASE_URL": database, "SDAPI_DATA_DIR": str(tmp_path)}
    target = f"file://{tmp_path / 'images'}"

    bad = await asyncio.to_thread(
        sdapi, "storage", "migrate", "--to", "ftp://x/y", env=env, cwd=tmp_path
    )
    assert bad.returncode == 2
    assert "--to" in bad.stderr

    ran = await asyncio.to_thread(
        sdapi, "storage", "migrate", "--to", target, env=env, cwd=tmp_path
    )
    assert ran.returncode == 1
    assert f"moved {len(expected) - 1} image(s)" in ran.stderr
    assert f"not moved: {damaged} (postgres): the stored bytes do not match" in (
        ran.stderr
    )
    assert "1 image(s) still name another store" in ran.stderr
    stores = Counter(
        [
            *await GeneratedImage.all().values_list("store", flat=True),
            *await InputImage.all().values_list("store", flat=True),
        ]
    )
    assert stores == {target: len(expected) - 1, "postgres": 1}
    copies = {
        key: hashlib.sha256((tmp_path / "images" / key).read_bytes()).hexdigest()
        for key in expected
        if key != damaged
    }
    assert copies == {key: h for key, h in expected.items() if key != damaged}


async def test_an_image_moved_back_waits_for_a_deletion_in_flight_there(
    database: str, s3_url: str
) -> None:
    postgres = ImageStores("postgres", timeout_s=5)
    expected = await _populate(postgres, users=1)
    to_s3 = ImageStores(s3_url, timeout_s=5)
    try:
        assert (await _mover(to_s3).run()).total_moved == len(expected)
        # The copies left in postgres are due for deletion, and a deleter is
        # deleting them (it holds their rows) as the images move back.
        await StorageDeletion.all().update(not_before=utcnow() - timedelta(seconds=1))
        claimed, release = asyncio.Event(), asyncio.Event()

        async def deleter() -> None:
            async with in_transaction():
                rows = await StorageDeletion.select_for_update(skip_locked=True).filter(
                    store="postgres"
                )
                assert {row.object_key for row in rows} == set(expected)
                claimed.set()
                await release.wait()
                await postgres.current.delete([row.object_key for row in rows])
                await StorageDeletion.filter(id__in=[row.id for row in rows]).delete()

        deleting = asyncio.create_task(deleter())
        await until(
            lambda: claimed.is_set() or deleting.done(),
            what="the deletions to be claimed",
        )
        assert not deleting.done(), deleting.exception()
        back = asyncio.create_task(_mover(postgres).run())
        await until(
            lambda: _waits_on_a_lock('DELETE FROM "storage_deletions"'),
            what="the move back to wait for the deletion in flight",
        )
        assert await ImageBlob.all().count() == len(expected)
        release.set()
        await deleting
        report = await back
        assert (report.total_moved, report.failures) == (len(expected), [])
        assert await _every_image_reads_back(postgres) == {"postgres": len(expected)}
        assert await _blob_hashes() == expected
        await _deletions_run(postgres)
        assert await _blob_hashes() == expected
    finally:
        await to_s3.close()
        # It read the images back from S3.
        await postgres.close()

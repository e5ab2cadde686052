"""The deletion sender: purges and the clean-up empty the stores, an object a
row names stays, and a store that is down is retried until it is empty."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from jobs import worker
from jobs.cleanup import clean_up
from jobs.resources import RESOURCES, JobsResources
from jobs.settings import JobsSettings
from jobs.storage_deleter import DeletionReport, delete_due_objects
from sdapi.contract.status import Status
from sdapi.db.connection import open_database
from sdapi.db.image_store import ImageStores
from sdapi.db.models import (
    GeneratedImage,
    Generation,
    ImageBlob,
    InputImage,
    StorageDeletion,
    utcnow,
)
from sdapi.devtools.accounts import make_user
from sdapi.infra.object_store import parse_store_url, result_object_key
from sdapi.infra.queue import create_queue_pool
from tests.image_support import image_bytes, stored_input, stored_result
from tests.jobs.conftest import make_generation, make_resources
from tests.s3_server import S3_ENV, MotoServer
from tests.support import until
from web.generations import delete_finished


def _s3_settings(
    jobs_settings: JobsSettings, url: str, *, backoff_s: float = 0.3
) -> JobsSettings:
    return jobs_settings.model_copy(
        update={
            "storage_url": parse_store_url(url).location,
            "storage_timeout": 3.0,
            "storage_deletion_backoff_base": backoff_s,
            "storage_deletion_backoff_max": backoff_s,
        }
    )


@contextlib.asynccontextmanager
async def _resources(settings: JobsSettings) -> AsyncIterator[JobsResources]:
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(open_database(settings.database_url or ""))
        yield await make_resources(settings, stack)()


@pytest.fixture
async def s3_jobs(
    jobs_settings: JobsSettings, s3_url: str
) -> AsyncIterator[JobsResources]:
    """Jobs' resources writing to a new bucket of the suite's S3 server."""
    async with _resources(_s3_settings(jobs_settings, s3_url)) as resources:
        yield resources


def _bucket(resources: JobsResources) -> str:
    return parse_store_url(resources.settings.storage_url).bucket


async def _blob_keys() -> list[str]:
    return sorted(await ImageBlob.all().values_list("key", flat=True))


async def _pretend_a_day_passed() -> None:
    await StorageDeletion.all().update(not_before=utcnow() - timedelta(seconds=1))


async def test_purge_and_clean_up_delete_the_objects_from_s3_and_postgres(
    s3_jobs: JobsResources, s3_server: MotoServer
) -> None:
    bucket = _bucket(s3_jobs)
    in_postgres = ImageStores("postgres", timeout_s=5)
    user = (await make_user()).user
    other = (await make_user()).user
    purged = await make_generation(user, status=Status.SUCCEEDED)
    kept = await make_generation(other, status=Status.SUCCEEDED)
    await stored_result(s3_jobs.stores, purged, 0, image_bytes())
    await stored_result(s3_jobs.stores, purged, 1, image_bytes())
    await stored_result(in_postgres, purged, 2, image_bytes())
    kept_image = await stored_result(s3_jobs.stores, kept, 0, image_bytes())
    unused = await stored_input(s3_jobs.stores, user, image_bytes())
    unused_in_postgres = await stored_input(in_postgres, user, image_bytes())
    assert len(s3_server.keys(bucket)) == 4
    assert len(await _blob_keys()) == 2

    assert await delete_finished(purged)
    # The database's own copy goes with the row; the bucket's are queued.
    assert await _blob_keys() == [unused_in_postgres.object_key]
    assert len(s3_server.keys(bucket)) == 4
    report = await delete_due_objects(s3_jobs)
    assert report == DeletionReport(deleted=2, in_use=0, failed=0)
    assert s3_server.keys(bucket) == sorted(
        [f"images/{kept_image.object_key}", f"images/{unused.object_key}"]
    )

    assert (await clean_up(s3_jobs)).input_images == 2
    assert await _blob_keys() == []
    assert (await delete_due_objects(s3_jobs)).deleted == 1
    assert s3_server.keys(bucket) == [f"images/{kept_image.object_key}"]

    # A day on, each write's own deletion comes due: the image still in use
    # stays, the rest are gone already (a deletion of nothing succeeds).
    await _pretend_a_day_passed()
    report = await delete_due_objects(s3_jobs)
    assert report == DeletionReport(deleted=5, in_use=1, failed=0)
    assert s3_server.keys(bucket) == [f"images/{kept_image.object_key}"]
    assert await s3_jobs.stores.current.get(kept_image.object_key)
    assert await StorageDeletion.all().count() == 0
    assert await GeneratedImage.filter(id=kept_image.id).exists()


async def test_an_object_whose_row_never_came_is_gone_after_a_day(
    s3_jobs: JobsResources, s3_server: MotoServer
) -> None:
    bucket = _bucket(s3_jobs)
    user = (await make_user()).user
    generation = await make_generation(user, status=Status.SUCCEEDED)
    named = await stored_result(s3_jobs.stores, generation, 0, image_bytes())
    # Written, then the process died before its row was created.
    orphan = result_object_key(generation.id, 1)
    await s3_jobs.stores.write(orphan, image_bytes())
    assert await delete_due_objects(s3_jobs) == DeletionReport()
    assert len(s3_server.keys(bucket)) == 2
    [queued] = await StorageDeletion.filter(object_key=orphan)
    assert queued.not_before > utcnow() + timedelta(hours=23)

    await _pretend_a_day_passed()
    assert await delete_due_objects(s3_jobs) == DeletionReport(deleted=1, in_use=1)
    assert s3_server.keys(bucket) == [f"images/{named.object_key}"]
    assert await StorageDeletion.all().count() == 0


async def test_a_store_that_is_down_is_retried_until_its_objects_are_gone(
    jobs_settings: JobsSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A server of its own, to stop (the suite's serves other tests).
    own = MotoServer(tmp_path)
    own.start()
    try:
        bucket = own.new_bucket()
        for name, value in S3_ENV.items():
            monkeypatch.setenv(name, value)
        settings = _s3_settings(jobs_settings, own.store_url(bucket), backoff_s=2.0)
        async with _resources(settings) as resources:
            user = (await make_user()).user
            generation = await make_generation(user, status=Status.SUCCEEDED)
            images = [
                await stored_result(resources.stores, generation, index, image_bytes())
                for index in range(3)
            ]
            await Generation.filter(id=generation.id).delete()
            assert len(own.keys(bucket)) == 3

            own.stop()
            started = utcnow()
            report = await delete_due_objects(resources)
            assert report == DeletionReport(failed=3)
            failed = await StorageDeletion.filter(attempts__gt=0)
            assert len(failed) == 3
            for row in failed:
                assert row.attempts == 1
                assert row.last_error
                assert row.not_before > started
            # Not tried again before its backoff ends.
            assert await delete_due_objects(resources) == DeletionReport()

            # Back, with its objects (moto forgets them when it stops; a real
            # store keeps them).
            own.start()
            client = own.client()
            client.create_bucket(Bucket=bucket)
            for image in images:
                client.put_object(
                    Bucket=bucket, Key=f"images/{image.object_key}", Body=b"x"
                )
            assert len(own.keys(bucket)) == 3

            async def retried() -> bool:
                await delete_due_objects(resources)
                return not own.keys(bucket)

            await until(retried, timeout=30, what="the deletions to be retried")
            # Only each write's own day-ahead deletion is left.
            left = await StorageDeletion.all()
            assert sorted(row.object_key for row in left) == sorted(
                image.object_key for image in images
            )
            assert all(row.attempts == 0 for row in left)
    finally:
        own.stop()


async def test_cascades_from_a_deleted_account_queue_their_objects(
    s3_jobs: JobsResources, s3_server: MotoServer
) -> None:
    bucket = _bucket(s3_jobs)
    user = (await make_user()).user
    generation = await make_generation(user, status=Status.SUCCEEDED)
    await stored_result(s3_jobs.stores, generation, 0, image_bytes())
    await stored_input(s3_jobs.stores, user, image_bytes())
    await user.delete()
    assert not await InputImage.filter(user_id=user.id).exists()
    assert (await delete_due_objects(s3_jobs)).deleted == 2
    assert s3_server.keys(bucket) == []


async def test_the_jobs_worker_deletes_purged_objects_by_itself(
    jobs_settings: JobsSettings, s3_url: str, s3_server: MotoServer
) -> None:
    settings = _s3_settings(jobs_settings, s3_url).model_copy(
        update={"storage_deletion_interval": 0.1}
    )
    bucket = parse_store_url(settings.storage_url).bucket
    redis = await create_queue_pool(settings.redis_url or "")
    ctx: dict[str, Any] = {"settings": settings, "redis": redis}
    try:
        await worker.on_startup(ctx)
        try:
            images = ctx[RESOURCES].stores
            assert images.current.location == settings.storage_url
            user = (await make_user()).user
            generation = await make_generation(user, status=Status.SUCCEEDED)
            await stored_result(images, generation, 0, image_bytes())
            assert len(s3_server.keys(bucket)) == 1
            assert await delete_finished(generation)
            await until(
                lambda: not s3_server.keys(bucket), what="the worker to delete it"
            )
        finally:
            await worker.on_shutdown(ctx)
    finally:
        await redis.aclose()

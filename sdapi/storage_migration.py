"""`sdapi storage migrate --to URL`: move every image to another store, live.

Each image is copied on its own: read from the store its row names, checked
against the row's sha256, written to the target, read back and checked again,
and only then is the row switched, by an UPDATE that holds only while the row
still names the store it was read from. Readers follow each row's store, so a
download finds its bytes before and after the switch; the copy left behind is
deleted by jobs' deleter once any download that started from it is over
(presigned URLs included). Nothing is held between images, so an interrupted
run loses nothing: the next one copies what still names another store.

Writes into the target are covered as the service's own are (a deletion a day
ahead, dropped by the deleter while a row names the object), so an object
whose row vanished or never switched is not left behind. Before writing, any
deletion already queued for that object in the target is removed: the
deleter holds a queued deletion's lock while it deletes, so this waits for a
deletion in flight instead of racing it (an image moved away and back).

The command never changes SDAPI_STORAGE_URL: the operator switches it on web
and jobs between two runs (docs/DEPLOY.md).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta

from tortoise.transactions import in_transaction

from sdapi.db.image_store import UNCLAIMED_OBJECT_TTL, ImageStores
from sdapi.db.models import GeneratedImage, InputImage, StorageDeletion, utcnow
from sdapi.infra.object_store import (
    BadStoreUrl,
    ObjectMissing,
    ObjectStore,
    StoreError,
    sha256_hex,
)

log = logging.getLogger(__name__)

# A download that started just before a row switched may still read the old
# copy: a presigned URL for its whole life, a stream for as long as a slow
# client takes. The old copy is deleted this long after the URLs expire.
DOWNLOAD_MARGIN = timedelta(minutes=15)
# Images copied at once (each its own read, write and read back).
CONCURRENCY = 8
# A run stops after this many failures in a row: a store that is down would
# otherwise fail every image in turn, each after its deadline.
MAX_FAILURES_IN_A_ROW = 20

ImageTable = type[GeneratedImage] | type[InputImage]
TABLES: tuple[tuple[str, ImageTable], ...] = (
    ("results", GeneratedImage),
    ("inputs", InputImage),
)


@dataclass(frozen=True)
class _Image:
    table: ImageTable
    id: uuid.UUID
    store: str
    object_key: str
    sha256: str


@dataclass
class MigrationReport:
    """What one run did, per table (`results`, `inputs`)."""

    target: str
    moved: dict[str, int] = field(default_factory=dict)
    # Rows deleted or moved by someone else while being copied: nothing to do.
    gone: int = 0
    # Images left where they were, with why (a rerun tries them again).
    failures: list[str] = field(default_factory=list)
    # Stopped early: the stores kept failing.
    stopped: bool = False

    @property
    def total_moved(self) -> int:
        return sum(self.moved.values())


class CopyFailed(Exception):
    """One image could not be moved; it stays where it was."""


class StorageMover:
    """Moves images to `images.current` (the target)."""

    def __init__(
        self,
        images: ImageStores,
        *,
        presign_s: float,
        batch_size: int,
        progress: Callable[[str], None],
    ) -> None:
        self._images = images
        self._target: ObjectStore = images.current
        self._old_copy_kept = timedelta(seconds=presign_s) + DOWNLOAD_MARGIN
        self._batch_size = batch_size
        self._progress = progress
        self._report = MigrationReport(target=self._target.location)
        self._failures_in_a_row = 0
        self._limit = asyncio.Semaphore(CONCURRENCY)

    async def to_move(self) -> dict[str, int]:
        """How many rows of each table name another store."""
        target = self._target.location
        return {
            name: await table.exclude(store=target).count() for name, table in TABLES
        }

    async def run(self) -> MigrationReport:
        """Move every image that names another store (one pass)."""
        self._report = MigrationReport(target=self._target.location)
        self._failures_in_a_row = 0
        counts = await self.to_move()
        total = sum(counts.values())
        self._progress(
            f"{total} image(s) to move to {self._target.location} "
            f"({counts['results']} results, {counts['inputs']} inputs)"
        )
        done = 0
        for name, table in TABLES:
            self._report.moved[name] = 0
            async for batch in self._batches(table):
                results = await asyncio.gather(*(self._move(i) for i in batch))
                self._report.moved[name] += sum(results)
                done += len(batch)
                self._progress(
                    f"{name}: {done} of {total} looked at, "
                    f"{self._report.total_moved} moved, "
                    f"{len(self._report.failures)} failed"
                )
                if self._report.stopped:
                    return self._report
        return self._report

    async def _batches(self, table: ImageTable) -> AsyncIterator[list[_Image]]:
        """Rows naming another store, in id order; a row that fails is not
        met again in this run (the next run retries it)."""
        after: uuid.UUID | None = None
        target = self._target.location
        while True:
            query = table.exclude(store=target)
            if after is not None:
                query = query.filter(id__gt=after)
            rows = (
                await query.order_by("id")
                .limit(self._batch_size)
                .values_list("id", "store", "object_key", "sha256")
            )
            if not rows:
                return
            after = rows[-1][0]
            yield [
                _Image(table, row_id, store, key, sha256)
                for row_id, store, key, sha256 in rows
            ]

    async def _move(self, image: _Image) -> bool:
        """Move one image; whether this call moved it."""
        async with self._limit:
            if self._report.stopped:
                return False
            try:
                moved = await self._copy_and_switch(image)
            except (CopyFailed, StoreError, BadStoreUrl) as exc:
                self._failed(image, str(exc) or type(exc).__name__)
                return False
            self._failures_in_a_row = 0
            return moved

    def _failed(self, image: _Image, why: str) -> None:
        message = f"{image.object_key} ({image.store}): {why}"
        self._report.failures.append(message)
        log.warning("not moved: %s", message)
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            self._report.stopped = True

    async def _still_there(self, image: _Image) -> bool:
        return await image.table.filter(id=image.id, store=image.store).exists()

    async def _copy_and_switch(self, image: _Image) -> bool:
        target = self._target
        key = image.object_key
        try:
            data = await self._images.at(image.store).get(key)
        except ObjectMissing:
            if await self._still_there(image):
                raise CopyFailed(
                    "its row names it, but its store has no such object"
                ) from None
            self._report.gone += 1
            return False
        if await asyncio.to_thread(sha256_hex, data) != image.sha256:
            raise CopyFailed("the stored bytes do not match the row's sha256")

        # Waits for a deleter deleting this very object from the target.
        await StorageDeletion.filter(store=target.location, object_key=key).delete()
        await StorageDeletion.create(
            store=target.location,
            object_key=key,
            not_before=utcnow() + UNCLAIMED_OBJECT_TTL,
        )
        await target.put(key, data)
        try:
            copied = await target.get(key)
        except ObjectMissing:
            raise CopyFailed("the target lost the object just written") from None
        if await asyncio.to_thread(sha256_hex, copied) != image.sha256:
            raise CopyFailed("the target's copy does not match the row's sha256")

        # One transaction: a run stopped here either left the row as it was
        # or switched it with its old copy's deletion queued.
        async with in_transaction():
            switched = await image.table.filter(id=image.id, store=image.store).update(
                store=target.location
            )
            if switched:
                await StorageDeletion.create(
                    store=image.store,
                    object_key=key,
                    not_before=utcnow() + self._old_copy_kept,
                )
        if switched:
            return True
        # Deleted (or moved by another run) meanwhile: the new copy goes now,
        # unless a row names it (the deleter checks).
        await StorageDeletion.create(
            store=target.location, object_key=key, not_before=utcnow()
        )
        self._report.gone += 1
        return False

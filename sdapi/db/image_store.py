"""The image stores a process uses: the one new images go to, and any other
that rows still name (an installation being moved, `sdapi storage migrate`).

Also the database's own store (`postgres`, table `image_blobs`), which needs
Tortoise and so lives here rather than beside the folder and S3 stores.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

from tortoise import connections

from sdapi.db.models import ImageBlob, StorageDeletion, utcnow
from sdapi.infra.file_store import FileStore
from sdapi.infra.object_store import (
    ObjectMissing,
    ObjectStore,
    OpenedObject,
    StoreSpec,
    StoreUnavailable,
    parse_store_url,
)

T = TypeVar("T")

# A written object whose row never commits (a crash between the two, a
# generation deleted meanwhile) is deleted this long after it was written: the
# deletion queued before each write is dropped if a row names the object then.
UNCLAIMED_OBJECT_TTL = timedelta(days=1)


class PostgresStore:
    """Bytes in `image_blobs`: today's single-machine behaviour. Inside a
    transaction its writes are part of it (Tortoise routes to the
    transaction's connection)."""

    def __init__(self, location: str, *, timeout_s: float) -> None:
        self._location = location
        self._timeout_s = timeout_s

    @property
    def location(self) -> str:
        return self._location

    async def _run(self, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except TimeoutError:
            raise StoreUnavailable("the database did not answer in time") from None

    async def put(self, key: str, data: bytes) -> None:
        await self._run(
            connections.get("default").execute_query(
                "INSERT INTO image_blobs (key, data, created_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (key) DO UPDATE SET data = EXCLUDED.data",
                [key, data, utcnow()],
            )
        )

    async def get(self, key: str) -> bytes:
        rows = await self._run(ImageBlob.filter(key=key).values_list("data", flat=True))
        if not rows:
            raise ObjectMissing(key)
        return bytes(rows[0])

    async def open(self, key: str) -> OpenedObject:
        data = await self.get(key)
        return OpenedObject(size=len(data), chunks=_one_chunk(data))

    async def delete(self, keys: Sequence[str]) -> None:
        await self._run(ImageBlob.filter(key__in=list(keys)).delete())

    async def presign(self, key: str, *, filename: str, expires_s: int) -> str | None:
        return None

    async def close(self) -> None:
        return None


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


def open_store(spec: StoreSpec, *, timeout_s: float) -> ObjectStore:
    """A store for a parsed URL; opens no connection yet."""
    if spec.kind == "postgres":
        return PostgresStore(spec.location, timeout_s=timeout_s)
    if spec.kind == "file":
        return FileStore(Path(spec.path), spec.location, timeout_s=timeout_s)
    # Imported here: aiobotocore is only loaded where an S3 store is used.
    from sdapi.infra.s3_store import S3Store

    return S3Store(spec, timeout_s=timeout_s)


@dataclass(frozen=True)
class StoredObject:
    """Where an image was written: the columns its row keeps."""

    store: str
    object_key: str
    size: int


class ImageStores:
    """The store new images are written to, and every store a row names.

    One per process (web's app, jobs' resources, the migrate command); each
    store is opened on first use and all are closed together.
    """

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        spec = parse_store_url(url)
        self.current: ObjectStore = open_store(spec, timeout_s=timeout_s)
        self._open: dict[str, ObjectStore] = {spec.location: self.current}

    def at(self, location: str) -> ObjectStore:
        """The store at a location a row names (opened once, then reused)."""
        store = self._open.get(location)
        if store is None:
            store = open_store(parse_store_url(location), timeout_s=self._timeout_s)
            self._open[location] = store
        return store

    async def write(self, key: str, data: bytes) -> StoredObject:
        """Write an image to the current store, for a row about to name it.

        Call it outside a transaction: the deletion queued first (a day ahead)
        must commit before the object exists, so an object whose row never
        commits is not left behind.
        """
        store = self.current
        await StorageDeletion.create(
            store=store.location,
            object_key=key,
            not_before=utcnow() + UNCLAIMED_OBJECT_TTL,
        )
        await store.put(key, data)
        return StoredObject(store=store.location, object_key=key, size=len(data))

    async def read(self, location: str, key: str) -> bytes:
        return await self.at(location).get(key)

    async def read_all(self, objects: Iterable[tuple[str, str]]) -> list[bytes]:
        """The bytes of (location, key) pairs, in order, read concurrently:
        a generation's images cost one store round trip, not one each. Call
        it outside a transaction (the `postgres` store's reads would share
        its one connection)."""
        return list(
            await asyncio.gather(*(self.read(where, key) for where, key in objects))
        )

    async def close(self) -> None:
        stores, self._open = list(self._open.values()), {}
        for store in stores:
            await store.close()

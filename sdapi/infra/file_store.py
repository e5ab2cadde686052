"""The folder store (`file:///path`): one machine with a big disk.

Every file operation runs in a thread under the store's deadline: a disk that
hangs (a dead NFS mount) answers StoreUnavailable, never a stuck event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

from sdapi.infra.object_store import (
    CHUNK_BYTES,
    ObjectMissing,
    OpenedObject,
    StoreUnavailable,
)

T = TypeVar("T")


class FileStore:
    def __init__(self, root: Path, location: str, *, timeout_s: float) -> None:
        self._root = root
        self._location = location
        self._timeout_s = timeout_s

    @property
    def location(self) -> str:
        return self._location

    def _path(self, key: str) -> Path:
        path = (self._root / key).resolve()
        # Keys are ours, but a key must never name a file outside the folder.
        if not path.is_relative_to(self._root.resolve()):
            raise ValueError(f"object key outside the store: {key!r}")
        return path

    async def _run(self, call: Callable[[], T]) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await asyncio.to_thread(call)
        except TimeoutError:
            raise StoreUnavailable(f"{self._location} did not answer in time") from None
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StoreUnavailable(f"{self._location}: {exc.strerror}") from exc

    async def put(self, key: str, data: bytes) -> None:
        path = self._path(key)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written aside and renamed: a reader never sees half an image.
            temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
            try:
                with temporary.open("wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                temporary.replace(path)
            finally:
                temporary.unlink(missing_ok=True)

        await self._run(write)

    async def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return await self._run(path.read_bytes)
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    async def open(self, key: str) -> OpenedObject:
        path = self._path(key)

        def open_file() -> tuple[BinaryIO, int]:
            file = path.open("rb")
            return file, os.fstat(file.fileno()).st_size

        try:
            file, size = await self._run(open_file)
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        return OpenedObject(size=size, chunks=self._chunks(file))

    async def _chunks(self, file: BinaryIO) -> AsyncIterator[bytes]:
        try:
            while chunk := await self._run(lambda: file.read(CHUNK_BYTES)):
                yield chunk
        finally:
            await asyncio.to_thread(file.close)

    async def delete(self, keys: Sequence[str]) -> None:
        paths = [self._path(key) for key in keys]

        def remove() -> None:
            for path in paths:
                path.unlink(missing_ok=True)
                # Empty folders go too: a purged generation leaves nothing.
                with contextlib.suppress(OSError):
                    path.parent.rmdir()

        await self._run(remove)

    async def presign(self, key: str, *, filename: str, expires_s: int) -> str | None:
        return None

    async def close(self) -> None:
        return None

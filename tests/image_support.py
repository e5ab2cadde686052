"""Image bytes in the tests: put where a row will name them, read where a row
says they are (sdapi.db.image_store), in whatever store that is. Rows are
written as jobs and web write them: `ImageStores.write` (its day-ahead
deletion queued first), then the row."""

from __future__ import annotations

import os
import uuid

from sdapi.db.image_store import ImageStores, StoredObject
from sdapi.db.models import GeneratedImage, Generation, InputImage, User
from sdapi.infra.object_store import input_object_key, result_object_key, sha256_hex


async def write_image(key: str, data: bytes, url: str = "postgres") -> StoredObject:
    """Write an image as web or jobs would, for a row the test then creates."""
    stores = ImageStores(url, timeout_s=10)
    try:
        return await stores.write(key, data)
    finally:
        await stores.close()


async def stored_bytes(row: GeneratedImage | InputImage) -> bytes:
    """The bytes of an image row, from the store it names."""
    stores = ImageStores(row.store, timeout_s=10)
    try:
        return await stores.read(row.store, row.object_key)
    finally:
        await stores.close()


def image_bytes(size: int = 2048) -> bytes:
    """Bytes no other image has (the stores never look inside)."""
    return b"\x89PNG\r\n\x1a\n" + os.urandom(size)


async def stored_result(
    images: ImageStores, generation: Generation, index: int, data: bytes
) -> GeneratedImage:
    stored = await images.write(result_object_key(generation.id, index), data)
    return await GeneratedImage.create(
        id=uuid.uuid4(),
        generation=generation,
        index=index,
        seed=index,
        width=64,
        height=64,
        sha256=sha256_hex(data),
        store=stored.store,
        object_key=stored.object_key,
        size=stored.size,
    )


async def stored_input(images: ImageStores, user: User, data: bytes) -> InputImage:
    image_id = uuid.uuid4()
    stored = await images.write(input_object_key(user.id, image_id), data)
    return await InputImage.create(
        id=image_id,
        user=user,
        sha256=sha256_hex(data),
        store=stored.store,
        object_key=stored.object_key,
        size=stored.size,
        width=64,
        height=64,
    )

"""Image bytes in the tests: put where a row will name them, read where a row
says they are (sdapi.db.image_store), in whatever store that is."""

from __future__ import annotations

from sdapi.db.image_store import ImageStores, StoredObject
from sdapi.db.models import GeneratedImage, InputImage


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

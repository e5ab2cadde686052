"""Every image store keeps the same promises (sdapi.infra.object_store)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from tortoise import Tortoise

from sdapi.db.connection import tortoise_config
from sdapi.db.image_store import ImageStores
from sdapi.infra.object_store import ObjectMissing, ObjectStore, parse_store_url


@pytest.fixture(params=["postgres", "file", "s3"])
async def store(
    request: pytest.FixtureRequest, clean_db: str, tmp_path: Path
) -> AsyncIterator[ObjectStore]:
    if request.param == "s3":
        url = request.getfixturevalue("s3_url")
    elif request.param == "file":
        url = f"file://{tmp_path / 'images'}"
    else:
        url = "postgres"
    await Tortoise.init(config=tortoise_config(clean_db))
    stores = ImageStores(url, timeout_s=5)
    try:
        yield stores.current
    finally:
        await stores.close()
        await Tortoise.close_connections()


async def test_an_object_reads_back_as_written_and_deletes(store: ObjectStore) -> None:
    data = bytes(range(256)) * 3000
    await store.put("results/a/0.png", data)
    assert await store.get("results/a/0.png") == data
    opened = await store.open("results/a/0.png")
    assert opened.size == len(data)
    assert b"".join([chunk async for chunk in opened.chunks]) == data
    await store.put("results/a/0.png", b"again")
    assert await store.get("results/a/0.png") == b"again"
    await store.delete(["results/a/0.png", "results/never/0.png"])
    with pytest.raises(ObjectMissing):
        await store.get("results/a/0.png")
    with pytest.raises(ObjectMissing):
        await store.open("results/a/0.png")


async def test_only_s3_presigns_and_its_url_downloads(store: ObjectStore) -> None:
    await store.put("results/b/1.png", b"\x89PNG pixels")
    url = await store.presign("results/b/1.png", filename="b-1.png", expires_s=60)
    if parse_store_url(store.location).kind != "s3":
        assert url is None
        return
    assert url is not None
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        assert answer.status == 200
        assert await answer.read() == b"\x89PNG pixels"
        assert answer.headers["Content-Type"] == "image/png"
        assert 'filename="b-1.png"' in answer.headers["Content-Disposition"]

"""Every image store keeps the same promises (sdapi.infra.object_store)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import aiohttp
import pytest
from tortoise import Tortoise

from sdapi.db.connection import tortoise_config
from sdapi.db.image_store import ImageStores
from sdapi.infra.file_store import FileStore
from sdapi.infra.object_store import (
    BadStoreUrl,
    ObjectMissing,
    ObjectStore,
    StoreSpec,
    StoreUnavailable,
    parse_store_url,
)
from sdapi.infra.s3_store import S3Store
from sdapi.infra.settings import CommonSettings, SettingsError
from tests.pausable_proxy import TcpProxy
from tests.s3_server import MotoServer


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


# --- a store that stalls, stops or fails --------------------------------------


@pytest.fixture
async def proxy(s3_server: MotoServer) -> AsyncIterator[TcpProxy]:
    """moto behind a TCP proxy the test can pause or stop."""
    started = TcpProxy("127.0.0.1", s3_server.port)
    await started.start()
    try:
        yield started
    finally:
        started.resume()
        await started.stop()


def via(proxy: TcpProxy, s3_url: str) -> StoreSpec:
    """The bucket of `s3_url`, reached through the proxy."""
    spec = parse_store_url(s3_url)
    return parse_store_url(
        f"s3://{spec.bucket}/{spec.prefix}?endpoint=http://{proxy.address}"
        f"&region={spec.region}"
    )


async def elapsed(work: Awaitable[object]) -> float:
    """Seconds until `work` raised StoreUnavailable (it must)."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await work
    return time.monotonic() - started


async def test_a_stalled_s3_store_is_unavailable_within_the_deadline(
    proxy: TcpProxy, s3_url: str
) -> None:
    store = S3Store(via(proxy, s3_url), timeout_s=1)
    try:
        await store.put("results/s/0.png", b"before")
        proxy.pause()
        # Each call gives up at its deadline (1 s), retries included.
        assert await elapsed(store.get("results/s/0.png")) < 2
        assert await elapsed(store.open("results/s/0.png")) < 2
        assert await elapsed(store.put("results/s/1.png", b"during")) < 2
        assert await elapsed(store.delete(["results/s/1.png"])) < 2
        # Signing needs no answer: a redirect still works, the server decides.
        assert await store.presign("results/s/0.png", filename="s.png", expires_s=60)
        proxy.resume()
        # The store recovers by itself once the server answers again. (The
        # held requests may still arrive: a timed-out write or deletion is
        # "unknown", which is why jobs retries them until they succeed.)
        assert await store.get("results/s/0.png") == b"before"
    finally:
        await store.close()


async def test_a_stall_mid_download_is_unavailable_not_a_hang(
    proxy: TcpProxy, s3_url: str
) -> None:
    # Larger than every buffer between moto and the client, so that the
    # read stalls once the proxy holds the rest.
    data = bytes(range(256)) * (64 * 1024)
    store = S3Store(via(proxy, s3_url), timeout_s=1)
    try:
        await store.put("results/m/0.png", data)
        opened = await store.open("results/m/0.png")
        assert opened.size == len(data)
        first = await anext(opened.chunks)
        proxy.pause()
        received = len(first)
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            async for chunk in opened.chunks:
                received += len(chunk)
        assert time.monotonic() - started < 3
        assert received < len(data)
    finally:
        await store.close()


async def test_a_stopped_s3_store_is_unavailable_at_once(
    proxy: TcpProxy, s3_url: str
) -> None:
    store = S3Store(via(proxy, s3_url), timeout_s=10)
    try:
        await store.put("results/d/0.png", b"before")
        await proxy.stop()
        # Refused connections fail long before the 10 s deadline (the time
        # is botocore's one retry, after a random backoff of up to 1 s).
        assert await elapsed(store.get("results/d/0.png")) < 4
        assert await elapsed(store.put("results/d/1.png", b"x")) < 4
        assert await elapsed(store.delete(["results/d/0.png"])) < 4
    finally:
        await store.close()


async def test_the_file_store_fails_as_the_interface_says(tmp_path: Path) -> None:
    root = tmp_path / "images"
    store = FileStore(root, f"file://{root}", timeout_s=1)
    await store.put("results/f/0.png", b"png")
    # Written aside and renamed: nothing but the object is left.
    assert [p.name for p in (root / "results/f").iterdir()] == ["0.png"]
    with pytest.raises(ObjectMissing):
        await store.open("results/f/1.png")
    # A key never reaches outside the folder.
    climbing = "/".join(["results", "..", "..", "outside.png"])
    for key in (climbing, "/etc/passwd"):
        with pytest.raises(ValueError, match="outside the store"):
            await store.put(key, b"x")
    # A key that is a folder, or a store whose folder is a file: unavailable
    # (an operator's mistake), not missing.
    with pytest.raises(StoreUnavailable):
        await store.get("results/f")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_bytes(b"")
    broken = FileStore(not_a_folder, f"file://{not_a_folder}", timeout_s=1)
    with pytest.raises(StoreUnavailable):
        await broken.put("results/f/0.png", b"png")
    with pytest.raises(StoreUnavailable):
        await broken.get("results/f/0.png")
    # Deleting the last object of a generation leaves no empty folder.
    await store.delete(["results/f/0.png", "results/f/9.png"])
    assert not (root / "results/f").exists()


async def test_a_hung_disk_is_unavailable_within_the_deadline(tmp_path: Path) -> None:
    root = tmp_path / "images"
    store = FileStore(root, f"file://{root}", timeout_s=0.5)
    # Opening a FIFO for reading blocks until a writer comes: a dead mount.
    (root / "results/h").mkdir(parents=True)
    fifo = root / "results/h/0.png"
    os.mkfifo(fifo)
    try:
        assert await elapsed(store.get("results/h/0.png")) < 1.5
    finally:
        # Let the blocked thread go, or the loop's executor waits on it.
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(writer)


# --- store URLs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("postgres", "postgres"),
        (" postgres:// ", "postgres"),
        ("file:///srv/images/", "file:///srv/images"),
        ("file://localhost/srv//images", "file:///srv/images"),
        ("s3://bucket", "s3://bucket/"),
        ("s3://bucket/a/b/", "s3://bucket/a/b/"),
        (
            "s3://b/p?region=garage&endpoint=https://s3.example.org/",
            "s3://b/p/?endpoint=https://s3.example.org&region=garage",
        ),
        (
            "s3://b.with.dots/p?endpoint=http://127.0.0.1:3900&region=",
            "s3://b.with.dots/p/?endpoint=http://127.0.0.1:3900",
        ),
    ],
)
def test_a_store_url_has_one_spelling(url: str, location: str) -> None:
    spec = parse_store_url(url)
    assert spec.location == location
    # The spelling kept in rows parses back to itself.
    assert parse_store_url(spec.location) == spec


def test_an_s3_url_names_its_parts() -> None:
    spec = parse_store_url("s3://imgs/deploy/a?endpoint=http://s3:3900&region=garage")
    assert (spec.kind, spec.bucket, spec.prefix) == ("s3", "imgs", "deploy/a/")
    assert (spec.endpoint, spec.region) == ("http://s3:3900", "garage")
    aws = parse_store_url("s3://imgs")
    assert (aws.endpoint, aws.region, aws.prefix) == (None, None, "")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "must be postgres"),
        ("mysql://db/x", "must be postgres"),
        ("/srv/images", "must be postgres"),
        ("file://host/srv", "file:///absolute/path"),
        ("file:relative/path", "file:///absolute/path"),
        ("file:///srv?sync=1", "takes no options"),
        ("s3://", "credentials come from the AWS_"),
        ("s3://AKIAEXAMPLE:hunter2@bucket/p", "credentials come from the AWS_"),
        ("s3://bucket:9000/p", "credentials come from the AWS_"),
        ("s3://bucket/p?endpoint=ftp://host", "http(s)://"),
        ("s3://bucket/p?endpoint=localhost:9000", "http(s)://"),
        ("s3://bucket/p?secret=hunter2&acl=public", "acl, secret"),
    ],
)
def test_a_bad_store_url_says_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(BadStoreUrl) as caught:
        parse_store_url(url)
    assert says in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_settings_keep_the_canonical_store_url() -> None:
    settings = CommonSettings(storage_url="s3://b/p?region=r&endpoint=http://s:1/")
    assert settings.storage_url == "s3://b/p/?endpoint=http://s:1&region=r"
    assert CommonSettings().storage_url == "postgres"
    assert CommonSettings().storage_redirect is False
    with pytest.raises(SettingsError) as caught:
        CommonSettings.from_env(storage_url="s3://KEY:hunter2@bucket")
    assert str(caught.value).startswith("bad setting SDAPI_STORAGE_URL: ")
    assert "hunter2" not in str(caught.value)
    for name, bad in (("storage_timeout", 0), ("storage_timeout", 61)):
        with pytest.raises(SettingsError, match=f"SDAPI_{name.upper()}"):
            CommonSettings.from_env(**{name: bad})

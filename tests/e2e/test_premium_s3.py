"""The premium flow unchanged with images in S3 (moto's server): the
WebSocket push, the REST download and the email's link, through real `sdapi
web`, `jobs` and `gpu-node` processes; web and jobs hold the store's
credentials, the node none. The same tests as tests/e2e/test_premium.py, run
against this module's stack."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sdapi.db.connection import open_database
from sdapi.db.models import GeneratedImage, ImageBlob
from sdapi.infra.object_store import parse_store_url
from tests.e2e.test_premium import (
    Client,
    Stack,
    premium_stack,
    test_email_delivery_arrives_with_the_png_and_a_download_link,
    test_websocket_client_gets_every_event_and_the_pushed_png,
)
from tests.e2e.test_premium import client as client
from tests.s3_server import S3_ENV, MotoServer

pytestmark = pytest.mark.slow

# A Valkey database of the suite's server, apart from the other modules'.
REDIS_DB = 7

# Collected here too, against the S3 stack below.
__all__ = [
    "test_email_delivery_arrives_with_the_png_and_a_download_link",
    "test_websocket_client_gets_every_event_and_the_pushed_png",
]


@pytest.fixture(scope="module")
def bucket(s3_server: MotoServer) -> str:
    return s3_server.new_bucket()


@pytest.fixture(scope="module")
def stack(
    database_url: str,
    redis_url: str,
    e2e_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: MotoServer,
    bucket: str,
) -> Iterator[Stack]:
    with premium_stack(
        database_url,
        redis_url,
        e2e_model_dir,
        tmp_path_factory.mktemp("premium-s3-e2e"),
        redis_db=REDIS_DB,
        env=S3_ENV,
        storage_url=s3_server.store_url(bucket),
    ) as found:
        yield found


@pytest.fixture
async def in_database(database_url: str) -> AsyncIterator[None]:
    async with open_database(database_url, pool_size=1):
        yield


async def test_results_are_in_the_bucket_not_the_database(
    client: Client, s3_server: MotoServer, bucket: str, in_database: None
) -> None:
    accepted, frames = await client.generate(
        {"prompt": "a buoy", "width": 64, "height": 64, "steps": 2}
    )
    assert frames[-1]["status"] == "succeeded"
    ident = accepted["id"]
    key = f"results/{ident}/0.png"
    assert f"images/{key}" in s3_server.keys(bucket)
    row = await GeneratedImage.get(generation_id=uuid.UUID(ident), index=0)
    assert row.store == parse_store_url(s3_server.store_url(bucket)).location
    assert not await ImageBlob.filter(key=key).exists()
    assert (
        await client.download(ident)
        == s3_server.client()
        .get_object(Bucket=bucket, Key=f"images/{key}")["Body"]
        .read()
    )

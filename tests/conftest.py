"""Real servers for the tests: PostgreSQL and a Redis-protocol server.

With SDAPI_TEST_DATABASE_URL / SDAPI_TEST_REDIS_URL unset (CI, a fresh clone)
the suite starts embedded PostgreSQL and Valkey in a temporary folder, so the
machine's own servers are never touched. Set them to use other servers; the
suite then creates (and drops) its own database there and flushes that Redis
database between tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from sdapi.devtools.embedded import EmbeddedValkey, embedded_postgres
from sdapi.devtools.s3_server import S3_ENV, MotoServer
from tests.consul_double import ConsulDouble

# The slowest modules, started first: under xdist (scripts/test) a long module
# collected last would run alone at the end while the other worker idles.
SLOW_MODULES = (
    "tests/test_packaging.py",
    "tests/e2e/test_schema_fuzz.py",
    "tests/e2e/test_dev.py",
    "tests/e2e/test_cluster.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.nodeid.partition("::")[0]
        return (
            SLOW_MODULES.index(module) if module in SLOW_MODULES else len(SLOW_MODULES)
        )

    items.sort(key=rank)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sdapi")


@pytest.fixture(scope="session")
def postgres_server_url(data_root: Path) -> Iterator[str]:
    """URL of a PostgreSQL database the suite may create databases beside."""
    url = os.environ.get("SDAPI_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with embedded_postgres(data_root / "db", database="sdapi_admin") as embedded_url:
        yield embedded_url


@pytest.fixture(scope="session")
def redis_url(data_root: Path) -> Iterator[str]:
    """URL of the Redis-protocol server the suite owns for its whole run."""
    url = os.environ.get("SDAPI_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedValkey(data_root / "valkey") as server:
        yield server.url


@pytest.fixture(autouse=False)
def clean_redis(redis_url: str) -> Iterator[str]:
    """An empty Redis database for one test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()
    yield redis_url


@pytest.fixture
async def redis_client(clean_redis: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(clean_redis)
    try:
        yield client
    finally:
        await client.aclose()


def _with_database(url: str, database: str) -> str:
    base, sep, query = url.partition("?")
    head = base.rsplit("/", 1)[0]
    return f"{head}/{database}{sep}{query}"


async def _admin(url: str, sql: str) -> None:
    import asyncpg
    from tortoise.backends.base.config_generator import expand_db_url

    creds = expand_db_url(url)["credentials"]
    conn = await asyncpg.connect(
        host=creds.get("host"),
        port=creds.get("port"),
        user=creds.get("user"),
        password=creds.get("password"),
        database=creds.get("database"),
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def database_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh database with every migration applied, for the whole run."""
    from sdapi.db.connection import apply_migrations

    name = f"sdapi_test_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(postgres_server_url, f'CREATE DATABASE "{name}"'))
    url = _with_database(postgres_server_url, name)
    asyncio.run(apply_migrations(url))
    try:
        yield url
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(
                _admin(postgres_server_url, f'DROP DATABASE "{name}" WITH (FORCE)')
            )


@pytest.fixture
def clean_db(database_url: str) -> str:
    """The test database with every table emptied."""
    from sdapi.db.connection import truncate_all

    asyncio.run(truncate_all(database_url))
    return database_url


@pytest.fixture
async def consul() -> AsyncIterator[ConsulDouble]:
    """A Consul agent double on a free port (tests/consul_double.py)."""
    double = ConsulDouble()
    await double.start()
    try:
        yield double
    finally:
        await double.close()


@pytest.fixture(scope="session")
def s3_server(data_root: Path) -> Iterator[MotoServer]:
    """moto's S3 server, for the whole run (sdapi/devtools/s3_server.py)."""
    server = MotoServer(data_root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_url(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """SDAPI_STORAGE_URL of a new, empty bucket, with the AWS credentials set
    in this process's environment (aiobotocore reads them there)."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    return s3_server.store_url(s3_server.new_bucket())

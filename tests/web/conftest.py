"""An in-process web app on the test database and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from sdapi.devtools.mailsink import mail_sink
from tests.node_double import NodeDouble, jobs_context
from web.app import create_app
from web.settings import WebSettings

AiohttpClient = Callable[..., Any]


@pytest.fixture
def web_settings(clean_db: str, clean_redis: str, tmp_path: Path) -> WebSettings:
    """Settings for an in-process app (cheap bcrypt, no Consul)."""
    return WebSettings(
        database_url=clean_db,
        redis_url=clean_redis,
        data_dir=tmp_path,
        secret_key=SecretStr("test-secret-key"),
        bcrypt_rounds=4,
        public_url="http://testserver.local",
    )


@pytest.fixture
async def node(
    client: TestClient, web_settings: WebSettings
) -> AsyncIterator[NodeDouble]:
    """A GPU node double serving `tiny`, announced before the first request."""
    assert web_settings.redis_url and web_settings.database_url
    async with jobs_context(web_settings.redis_url, web_settings.database_url) as ctx:
        double = NodeDouble(ctx)
        await double.announce()
        yield double


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, web_settings: WebSettings
) -> TestClient:
    """A client of the app built from `web_settings`."""
    result: TestClient = await aiohttp_client(create_app(web_settings))
    return result


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A local SMTP server that keeps what it receives in a folder."""
    folder = tmp_path / "mail"
    with mail_sink(folder) as url:
        yield url, folder

"""An in-process web app on the test database and Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

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
async def client(
    aiohttp_client: AiohttpClient, web_settings: WebSettings
) -> TestClient:
    """A client of the app built from `web_settings`."""
    result: TestClient = await aiohttp_client(create_app(web_settings))
    return result

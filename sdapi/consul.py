"""Opening py-consul's asyncio client from a URL."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit


@contextlib.asynccontextmanager
async def open_consul(url: str) -> AsyncIterator[Any]:
    """A `consul.aio.Consul` for `url`, made inside the running loop; closed after."""
    import consul.aio

    parts = urlsplit(url)
    with warnings.catch_warnings():
        # py-consul 1.8 builds its aiohttp connector with the deprecated
        # verify_ssl/ssl_context arguments; the behaviour is still correct.
        warnings.simplefilter("ignore", DeprecationWarning)
        client = consul.aio.Consul(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (443 if parts.scheme == "https" else 8500),
            scheme=parts.scheme or "http",
        )
    try:
        yield client
    finally:
        await client.http._session.close()

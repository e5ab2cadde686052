"""Opening py-consul's asyncio client from a URL."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit


def consul_client(url: str) -> Any:
    """A `consul.aio.Consul` for an http(s)://host:port URL (call inside a loop)."""
    import consul.aio

    parts = urlsplit(url)
    scheme = parts.scheme or "http"
    with warnings.catch_warnings():
        # py-consul 1.8 builds its aiohttp connector with the verify_ssl /
        # ssl_context arguments that aiohttp 3.14 deprecates; they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        return consul.aio.Consul(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (443 if scheme == "https" else 8500),
            scheme=scheme,
            verify=scheme == "https",
        )


@contextlib.asynccontextmanager
async def open_consul(url: str) -> AsyncIterator[Any]:
    """A Consul client for `url`, closed on exit."""
    client = consul_client(url)
    try:
        yield client
    finally:
        await client.close()

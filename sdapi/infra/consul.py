"""Opening py-consul's asyncio client from a URL."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

# How long one call to the agent may take, connecting included (seconds): the
# agent is local, so a slow one is a sick one, and callers must not hang on it.
DEFAULT_TIMEOUT_S = 5.0


def consul_client(url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """A `consul.aio.Consul` for an http(s)://host:port URL (call inside a loop).

    Every call fails with TimeoutError after `timeout_s` seconds.
    """
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
            connections_timeout=timeout_s,
        )


@contextlib.asynccontextmanager
async def open_consul(
    url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> AsyncIterator[Any]:
    """A Consul client for `url` (calls bounded by `timeout_s`), closed on exit."""
    client = consul_client(url, timeout_s=timeout_s)
    try:
        yield client
    finally:
        await client.close()

"""Opening py-consul's asyncio client from a URL; service URLs resolved at start."""

from __future__ import annotations

import contextlib
import json
import urllib.request
import warnings
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from aiohttp import ClientError

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


def consul_errors() -> tuple[type[BaseException], ...]:
    """What a call to the agent raises when Consul cannot answer it (catch these).

    py-consul is imported on first use: a process without Consul never loads it.
    """
    from consul import ConsulException

    return (ConsulException, ClientError, OSError, TimeoutError)


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


# A host of this form names a Consul service, as Consul's DNS interface does:
# `redis://sdapi-redis.service.consul/0` is whichever healthy instance the
# agent lists, at that instance's port.
SERVICE_DOMAIN = ".service.consul"


class ServiceNotFound(LookupError):
    """No healthy instance of a Consul service, or the agent did not answer."""


def service_name(host: str | None) -> str | None:
    """The Consul service a `<name>.service.consul` host names, else None."""
    if not host or not host.endswith(SERVICE_DOMAIN):
        return None
    # `[tag.]name.service.consul`: the name is the label before the domain.
    return host[: -len(SERVICE_DOMAIN)].rsplit(".", 1)[-1] or None


def resolve_service_url(
    url: str, consul_url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> str:
    """`url` with a `<name>.service.consul` host replaced by the address and
    port of a healthy instance the Consul agent lists (blocking: start-up only).

    Other URLs come back unchanged.
    """
    parts = urlsplit(url)
    name = service_name(parts.hostname)
    if name is None:
        return url
    query = f"{consul_url.rstrip('/')}/v1/health/service/{quote(name)}?passing=1"
    try:
        with urllib.request.urlopen(query, timeout=timeout_s) as response:  # noqa: S310
            entries = json.load(response)
    except (OSError, ValueError) as exc:
        raise ServiceNotFound(
            f"cannot ask the Consul agent at {consul_url} for {name!r}: {exc}"
        ) from None
    for entry in entries if isinstance(entries, list) else []:
        service = entry.get("Service") or {}
        address = service.get("Address") or (entry.get("Node") or {}).get("Address")
        port = service.get("Port")
        if address and port:
            host = f"[{address}]" if ":" in address else address
            userinfo = parts.netloc.rpartition("@")[0]
            netloc = f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}"
            return urlunsplit(parts._replace(netloc=netloc))
    raise ServiceNotFound(f"Consul lists no healthy instance of {name!r}")

"""Which models healthy GPU nodes serve: from Consul, or from Redis without it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import aiohttp
from pydantic import ValidationError
from redis.asyncio import Redis

from sdapi.contract.names import GPU_SERVICE, KNOWN_MODELS_KEY
from sdapi.contract.nodes import GENERIC_LIMITS, ModelLimits, NodeInfo
from sdapi.infra.announcements import live_nodes

log = logging.getLogger(__name__)

# Retry-After while Consul cannot be asked and nothing is cached (seconds).
CONSUL_RETRY_S = 10


class ModelOffer(ModelLimits):
    """A model as the API presents it: what its healthy nodes agree on."""

    id: str
    nodes: int
    available: bool

    @classmethod
    def combine(cls, model: str, infos: list[NodeInfo]) -> ModelOffer:
        """The offer of `model` across its nodes (the tightest limits win)."""
        limits = ModelLimits.tightest(infos)
        return cls(id=model, nodes=len(infos), available=True, **dict(limits))

    @classmethod
    def offline(cls, model: str, last_seen: NodeInfo | None) -> ModelOffer:
        """A configured model no healthy node serves right now."""
        limits = GENERIC_LIMITS if last_seen is None else last_seen.limits()
        return cls(id=model, nodes=0, available=False, **dict(limits))


class NodesUnknown(Exception):
    """The healthy GPU nodes cannot be listed: Consul is unreachable and no
    list was read yet. `web` answers 503; `jobs` tries again next round."""

    retry_after_s = CONSUL_RETRY_S


def _consul_errors() -> tuple[type[BaseException], ...]:
    import consul

    return (consul.ConsulException, aiohttp.ClientError, OSError, TimeoutError)


class NodeRegistry:
    """Healthy GPU nodes, cached for `cache_s` seconds.

    While Consul cannot be asked (down, slow, answering errors) the nodes last
    seen stay in use; before any were seen, asking is a 503.
    """

    def __init__(
        self,
        redis: Redis,
        consul: Any | None = None,
        *,
        configured_models: Iterable[str] = (),
        cache_s: float = 1.0,
    ) -> None:
        self._redis = redis
        self._consul = consul
        self._configured = tuple(configured_models)
        self._cache_s = cache_s
        # None until the first successful fetch.
        self._cached: list[NodeInfo] | None = None
        self._cached_at = -1e9
        self._remembered: dict[str, str] = {}
        self._lock = asyncio.Lock()

    @property
    def uses_consul(self) -> bool:
        return self._consul is not None

    async def nodes(self) -> list[NodeInfo]:
        """Healthy nodes now (Consul's passing checks, or live Redis entries)."""
        async with self._lock:
            if time.monotonic() - self._cached_at > self._cache_s:
                fetched = await self._fetch()
                # Also after a failure: Consul is asked again once the cache
                # has aged, not by every request while it is down.
                self._cached_at = time.monotonic()
                if fetched is not None:
                    self._cached = fetched
                    await self._remember(fetched)
            if self._cached is None:
                raise NodesUnknown
            return list(self._cached)

    def invalidate(self) -> None:
        """Forget the cache (tests, or after a node went away)."""
        self._cached_at = -1e9

    async def offers(self) -> dict[str, ModelOffer]:
        """Every model served by a healthy node, plus configured ones (offline)."""
        by_model: dict[str, list[NodeInfo]] = {}
        for info in await self.nodes():
            by_model.setdefault(info.model, []).append(info)
        offers = {
            model: ModelOffer.combine(model, infos) for model, infos in by_model.items()
        }
        missing = [model for model in self._configured if model not in offers]
        if missing:
            known = await self._known(missing)
            for model in missing:
                offers[model] = ModelOffer.offline(model, known.get(model))
        return dict(sorted(offers.items()))

    async def _fetch(self) -> list[NodeInfo] | None:
        """The healthy nodes now; None when Consul could not be asked."""
        if self._consul is None:
            return await self._from_redis()
        try:
            return await self._from_consul(self._consul)
        except _consul_errors() as exc:
            log.warning(
                "cannot list %s services in Consul (%s: %s); %s",
                GPU_SERVICE,
                type(exc).__name__,
                exc,
                "nothing to fall back on"
                if self._cached is None
                else "keeping the nodes last seen",
            )
            return None

    async def _from_consul(self, consul: Any) -> list[NodeInfo]:
        _, entries = await consul.health.service(GPU_SERVICE, passing=True)
        return _parse(entry.get("Service", {}).get("Meta") or {} for entry in entries)

    async def _from_redis(self) -> list[NodeInfo]:
        return await live_nodes(self._redis)

    async def _remember(self, infos: list[NodeInfo]) -> None:
        # Written only when an announcement differs from what this replica
        # last wrote: the refresh runs every second on the request path.
        mapping = {info.model: info.model_dump_json() for info in infos}
        changed = {m: v for m, v in mapping.items() if self._remembered.get(m) != v}
        if changed:
            await self._redis.hset(KNOWN_MODELS_KEY, mapping=changed)  # type: ignore[misc]
            self._remembered.update(changed)

    async def _known(self, models: list[str]) -> dict[str, NodeInfo]:
        values = await self._redis.hmget(KNOWN_MODELS_KEY, models)  # type: ignore[misc]
        known = {}
        for model, value in zip(models, values, strict=True):
            if value is None:
                continue
            try:
                known[model] = NodeInfo.model_validate_json(value)
            except ValidationError:
                # Written by an older or newer release: generic defaults then.
                log.warning(
                    "ignoring a malformed entry for %r in %s", model, KNOWN_MODELS_KEY
                )
        return known


def _parse(metas: Iterable[dict[str, Any]]) -> list[NodeInfo]:
    infos = []
    for meta in metas:
        try:
            infos.append(NodeInfo.from_meta(meta))
        except ValidationError:
            log.warning("ignoring a %s service with malformed Meta", GPU_SERVICE)
    return infos

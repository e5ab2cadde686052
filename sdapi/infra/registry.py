"""Which models healthy GPU nodes serve: from Consul, or from Redis without it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

from pydantic import Field, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sdapi.contract.names import GPU_SERVICE, KNOWN_MODELS_KEY, KNOWN_MODELS_SEEN_KEY
from sdapi.contract.nodes import GENERIC_LIMITS, LoraOffer, ModelLimits, NodeInfo
from sdapi.infra.announcements import live_nodes
from sdapi.infra.backoff import backoff_s
from sdapi.infra.consul import consul_errors

log = logging.getLogger(__name__)

# Retry-After while Consul cannot be asked and nothing is cached (seconds).
CONSUL_RETRY_S = 10
# How long a model stays known (accepted, queued) after a node last served
# it, so that work for a model scaled to zero waits for a node (seconds).
KNOWN_FOR_S = 24 * 3600
# How often a process refreshes a served model's time seen (seconds).
SEEN_REFRESH_S = 60
# A blocking query's `wait`, and the least time between two of them (seconds).
CONSUL_WAIT_S = 30
WATCH_MIN_SPACING_S = 0.05
# Longest pause between attempts while Consul or Redis fails (seconds).
WATCH_RETRY_MAX_S = 10
# How long a read waits for the first (or an asked-for) view (seconds).
FIRST_VIEW_WAIT_S = 5


ModelState = Literal["ready", "loadable", "waiting_for_node"]


class ModelOffer(ModelLimits):
    """A model as the API presents it: what its healthy nodes agree on."""

    id: str
    nodes: int
    available: bool
    # sd1, sd2, sdxl, with `-inpaint` variants; "" while no node told.
    kind: str = ""
    # ready: loaded on a healthy node; loadable: a healthy node has it on
    # disk (the first job waits for the load); waiting_for_node: none has.
    state: ModelState = "waiting_for_node"
    # Every LoRA some node of the model has (the first node's entry per name).
    loras: list[LoraOffer] = Field(default_factory=list)
    # The base kind its LoRAs must be for ("" when no node said): a picker
    # offers only the `loras` of this kind.
    lora_kind: str = ""

    @classmethod
    def combine(cls, model: str, infos: list[NodeInfo]) -> ModelOffer:
        """The offer of `model` across its nodes (the tightest limits win)."""
        # Limits of nodes that loaded it are its own; others only guess.
        loaded = [info for info in infos if info.loaded]
        limits = ModelLimits.tightest(loaded or infos)
        loras: dict[str, LoraOffer] = {}
        for info in infos:
            for lora in info.loras:
                loras.setdefault(lora.name, lora)
        return cls(
            id=model,
            nodes=len(infos),
            available=True,
            kind=next((info.kind for info in infos if info.kind), ""),
            state="ready" if loaded else "loadable",
            loras=sorted(loras.values(), key=lambda lora: lora.name),
            lora_kind=next((i.lora_kind for i in infos if i.lora_kind), ""),
            **dict(limits),
        )

    @classmethod
    def offline(cls, model: str, last_seen: NodeInfo | None) -> ModelOffer:
        """A configured model no healthy node serves right now: the LoRAs its
        last node announced stay accepted (the work waits for a node)."""
        limits = GENERIC_LIMITS if last_seen is None else last_seen.limits()
        kind = "" if last_seen is None else last_seen.kind
        loras = [] if last_seen is None else last_seen.loras
        lora_kind = "" if last_seen is None else last_seen.lora_kind
        return cls(
            id=model,
            nodes=0,
            available=False,
            kind=kind,
            state="waiting_for_node",
            loras=loras,
            lora_kind=lora_kind,
            **dict(limits),
        )


class NodesUnknown(Exception):
    """The healthy GPU nodes cannot be listed: Consul is unreachable and no
    list was read yet. `web` answers 503; `jobs` tries again next round."""

    retry_after_s = CONSUL_RETRY_S


class NodeRegistry:
    """Healthy GPU nodes and the models they serve, as this process sees them.

    With Consul and `watching()` running (web and jobs), a background task
    keeps the view current with blocking queries on Consul's health endpoint:
    reads are in memory, never a Consul call on the request path. Without
    Consul a read takes the Redis announcements (one ZRANGE and one MGET),
    cached for `cache_s`. While Consul cannot be asked the nodes last seen
    stay in use; before any were seen, reading raises NodesUnknown.
    """

    def __init__(
        self,
        redis: Redis,
        consul: Any | None = None,
        *,
        configured_models: Iterable[str] = (),
        cache_s: float = 1.0,
        known_for_s: float = KNOWN_FOR_S,
    ) -> None:
        self._redis = redis
        self._consul = consul
        self._configured = tuple(configured_models)
        self._cache_s = cache_s
        self._known_for_s = known_for_s
        # None until the first successful fetch.
        self._cached: list[NodeInfo] | None = None
        self._cached_at = -1e9
        self._known: dict[str, NodeInfo | None] = {}
        self._remembered: dict[str, str] = {}
        self._seen_at: dict[str, float] = {}
        self._lock = asyncio.Lock()
        self._watching = False
        self._fresh = asyncio.Event()
        self._kick = asyncio.Event()
        self.consul_ok: bool | None = None if consul is None else False

    @property
    def uses_consul(self) -> bool:
        return self._consul is not None

    async def nodes(self) -> list[NodeInfo]:
        """Healthy nodes now (Consul's passing checks, or live Redis entries)."""
        if self._watching:
            if not self._fresh.is_set():
                # The first view, or one asked for by `invalidate`: worth a
                # short wait, never longer than a call to Consul may take.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FIRST_VIEW_WAIT_S):
                        await self._fresh.wait()
            if self._cached is None:
                raise NodesUnknown
            return list(self._cached)
        async with self._lock:
            if time.monotonic() - self._cached_at > self._cache_s:
                fetched = await self._fetch()
                # Also after a failure: Consul is asked again once the cache
                # has aged, not by every request while it is down.
                self._cached_at = time.monotonic()
                if fetched is not None:
                    self._cached = fetched
                    await self._remember(fetched)
                    await self._refresh_known()
            if self._cached is None:
                raise NodesUnknown
            return list(self._cached)

    def serves(self, model: str) -> bool | None:
        """Whether a healthy node serves `model` in the current view (no I/O);
        None before any view was read."""
        if self._cached is None:
            return None
        return any(info.model == model for info in self._cached)

    def invalidate(self) -> None:
        """Make the next read wait for a fresh view (tests, a node went away)."""
        self._cached_at = -1e9
        self._fresh.clear()
        self._kick.set()

    async def offers(self) -> dict[str, ModelOffer]:
        """Every model served by a healthy node, plus the known ones no node
        serves now (configured, or served within `known_for_s`): offline."""
        by_model: dict[str, list[NodeInfo]] = {}
        for info in await self.nodes():
            by_model.setdefault(info.model, []).append(info)
        offers = {
            model: ModelOffer.combine(model, infos) for model, infos in by_model.items()
        }
        for model in (*self._configured, *self._known):
            if model not in offers:
                offers[model] = ModelOffer.offline(model, self._known.get(model))
        return dict(sorted(offers.items()))

    @contextlib.asynccontextmanager
    async def watching(
        self, watch_consul: Any | None = None, *, wait_s: float = CONSUL_WAIT_S
    ) -> AsyncIterator[None]:
        """With Consul, keep the view current in the background until the
        block ends; without, nothing to do (reads take Redis, cached).

        `watch_consul` is a Consul client whose calls may last `wait_s` plus
        a margin: a blocking query holds its call open.
        """
        if self._consul is None:
            yield
            return
        if watch_consul is None:
            raise ValueError("watching Consul needs a client for blocking queries")
        task = asyncio.create_task(
            self._watch(watch_consul, wait_s), name="gpu-node-watch"
        )
        self._watching = True
        try:
            yield
        finally:
            self._watching = False
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self, consul: Any, wait_s: float) -> None:
        index: str | None = None
        failures = 0
        while True:
            self._kick.clear()
            started = time.monotonic()
            try:
                index, nodes = await self._blocking_query(consul, index, wait_s)
            except asyncio.CancelledError:
                raise
            except consul_errors() as exc:
                failures += 1
                index = None
                if failures == 1:
                    self.consul_ok = False
                    log.warning(
                        "cannot watch %s in Consul (%s: %s); %s",
                        GPU_SERVICE,
                        type(exc).__name__,
                        exc,
                        "nothing to fall back on"
                        if self._cached is None
                        else "keeping the nodes last seen",
                    )
                # Readers waiting for a view get the last one (or a 503).
                self._fresh.set()
                await self._pause(backoff_s(failures, base=1.0, cap=WATCH_RETRY_MAX_S))
                continue
            if failures:
                log.info("Consul answers again; watching %s", GPU_SERVICE)
            failures = 0
            self.consul_ok = True
            self._cached = nodes
            self._fresh.set()
            try:
                await self._remember(nodes)
                await self._refresh_known()
            except (RedisError, OSError) as exc:
                log.warning("cannot note the known models in Redis: %s", exc)
            if time.monotonic() - started < WATCH_MIN_SPACING_S:
                # An agent that answers at once (an index that went backwards,
                # a restarted agent): never spin.
                await self._pause(WATCH_MIN_SPACING_S)

    async def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less when `invalidate` asks for a fresh view."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose the
        # watch's cancellation (sdapi/infra/redis_writes.py tells how).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._kick.wait()

    async def _blocking_query(
        self, consul: Any, index: str | None, wait_s: float
    ) -> tuple[str | None, list[NodeInfo]]:
        query = asyncio.ensure_future(
            consul.health.service(
                GPU_SERVICE, passing=True, index=index, wait=f"{int(wait_s)}s"
            )
        )
        kicked = asyncio.ensure_future(self._kick.wait())
        try:
            await asyncio.wait({query, kicked}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled (the watch ends): the query must not outlive it.
            query.cancel()
            raise
        finally:
            kicked.cancel()
        if not query.done():
            # `invalidate`: ask again at once, without the index.
            query.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await query
            self._kick.clear()
            return await self._blocking_query(consul, None, wait_s)
        new_index, entries = query.result()
        # Consul's rule for blocking queries: an index that goes backwards
        # (the agent restarted, a snapshot was restored) starts over from 0.
        if index is not None and new_index is not None:
            with contextlib.suppress(ValueError):
                if int(new_index) < int(index):
                    new_index = None
        nodes = _parse(entry.get("Service", {}).get("Meta") or {} for entry in entries)
        return new_index, nodes

    async def _fetch(self) -> list[NodeInfo] | None:
        """The healthy nodes now; None when Consul could not be asked."""
        if self._consul is None:
            return await self._from_redis()
        try:
            _, entries = await self._consul.health.service(GPU_SERVICE, passing=True)
        except consul_errors() as exc:
            self.consul_ok = False
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
        self.consul_ok = True
        return _parse(entry.get("Service", {}).get("Meta") or {} for entry in entries)

    async def _from_redis(self) -> list[NodeInfo]:
        return await live_nodes(self._redis)

    async def _remember(self, infos: list[NodeInfo]) -> None:
        """Note which models nodes serve, so they stay known while no node does."""
        # Written only when an announcement differs from what this process
        # last wrote, and its time seen at most every SEEN_REFRESH_S.
        mapping = {info.model: info.model_dump_json() for info in infos}
        changed = {m: v for m, v in mapping.items() if self._remembered.get(m) != v}
        now = time.time()
        seen = {
            model: now
            for model in mapping
            if now - self._seen_at.get(model, 0.0) > SEEN_REFRESH_S
        }
        if not changed and not seen:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            if changed:
                pipe.hset(KNOWN_MODELS_KEY, mapping=changed)
            if seen:
                pipe.zadd(KNOWN_MODELS_SEEN_KEY, seen)
            await pipe.execute()
        self._remembered.update(changed)
        self._seen_at.update(seen)

    async def _refresh_known(self) -> None:
        """The known models and their last announcements, from Redis."""
        recent = await self._redis.zrangebyscore(
            KNOWN_MODELS_SEEN_KEY, time.time() - self._known_for_s, "+inf"
        )
        models = sorted(
            {m.decode() if isinstance(m, bytes) else str(m) for m in recent}
            | set(self._configured)
        )
        values = await self._redis.hmget(KNOWN_MODELS_KEY, models) if models else []  # type: ignore[misc]
        known: dict[str, NodeInfo | None] = {}
        for model, value in zip(models, values, strict=True):
            known[model] = None
            if value is None:
                continue
            try:
                known[model] = NodeInfo.model_validate_json(value)
            except ValidationError:
                # Written by an older or newer release: generic defaults then.
                log.warning(
                    "ignoring a malformed entry for %r in %s", model, KNOWN_MODELS_KEY
                )
        self._known = known


def _parse(metas: Iterable[dict[str, Any]]) -> list[NodeInfo]:
    infos = []
    for meta in metas:
        try:
            infos.append(NodeInfo.from_meta(meta))
        except ValidationError:
            log.warning("ignoring a %s service with malformed Meta", GPU_SERVICE)
    return infos

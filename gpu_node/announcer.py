"""Telling the cluster a node is alive: a Redis key always, Consul when configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from sdapi.contract.names import GPU_SERVICE
from sdapi.contract.nodes import NodeInfo
from sdapi.infra.announcements import announce_node, announcement_ttl_s, withdraw_node
from sdapi.infra.consul import consul_client, consul_errors

log = logging.getLogger(__name__)


def service_id(node_id: str, index: int = 0) -> str:
    """Consul service id of a node's `index`th model (0: its first)."""
    return f"{GPU_SERVICE}-{node_id}" + (f"-{index}" if index else "")


def check_id(node_id: str, index: int = 0) -> str:
    """The id Consul gives the single check of a node's model's service."""
    return f"service:{service_id(node_id, index)}"


def announcement_id(node_id: str, index: int) -> str:
    """The Redis announcement id of a node's `index`th model (0: its first)."""
    return f"{node_id}+{index}" if index else node_id


class Announcer:
    """Keeps the node's Redis keys and Consul TTL checks fresh while it is healthy.

    A node announces each model it serves on its own (a Redis key, a Consul
    service), so every reader sees one entry per node and model.
    """

    def __init__(
        self,
        redis_client: Redis,
        infos: Callable[[], list[NodeInfo]],
        *,
        every_s: float,
        consul_url: str | None,
        ttl_s: int,
        deregister_after_s: int,
        address: str,
        port: int,
        health: Callable[[], tuple[bool, str]],
    ) -> None:
        self._redis = redis_client
        self._infos = infos
        self._node_id = infos()[0].node_id
        # What each Consul service was registered with; a change (a model
        # loaded or unloaded) registers it again.
        self._metas: dict[int, dict[str, str]] = {}
        self._count = 0
        self._every_s = every_s
        # Long enough that a node refreshing every `every_s` never flaps out.
        self._redis_ttl_s = announcement_ttl_s(every_s)
        self._consul_url = consul_url
        self._ttl_s = ttl_s
        self._deregister_after_s = deregister_after_s
        self._address = address
        self._port = port
        self._health = health
        self._consul: Any = None
        self._withdrawn = False
        self._task: asyncio.Task[None] | None = None
        self.redis_ok = False

    async def start(self) -> None:
        """Announce once now, then keep announcing in the background."""
        if self._consul_url:
            self._consul = consul_client(self._consul_url)
        await self.announce()
        self._task = asyncio.create_task(self._loop(), name="announcer")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._every_s)
            await self.announce()

    async def announce(self) -> None:
        """Refresh the Redis keys and the Consul checks once."""
        if self._withdrawn:
            return
        infos = self._infos()
        self._count = max(self._count, len(infos))
        try:
            for index, info in enumerate(infos):
                await announce_node(
                    self._redis,
                    info,
                    self._redis_ttl_s,
                    announcement_id=announcement_id(info.node_id, index),
                )
            self.redis_ok = True
        except (RedisError, OSError) as exc:
            self.redis_ok = False
            log.warning("cannot announce the node in Redis: %s", exc)
        if self._consul is not None:
            await self._refresh_consul(infos)

    async def _register(self, index: int, info: NodeInfo) -> None:
        sid = service_id(info.node_id, index)
        check = {
            "Name": f"{GPU_SERVICE} worker alive",
            "TTL": f"{self._ttl_s}s",
            "DeregisterCriticalServiceAfter": f"{self._deregister_after_s}s",
            "Notes": "passed by the node while its worker runs",
        }
        meta = info.to_meta()
        await self._consul.agent.service.register(
            GPU_SERVICE,
            service_id=sid,
            address=self._address,
            port=self._port,
            tags=[f"model:{info.model}"],
            meta=meta,
            check=check,
        )
        if index not in self._metas:
            log.info(
                "registered %s in Consul (check %s)",
                sid,
                check_id(info.node_id, index),
            )
        self._metas[index] = meta

    async def _refresh_consul(self, infos: list[NodeInfo]) -> None:
        healthy, note = self._health()
        healthy = healthy and self.redis_ok
        try:
            for index, info in enumerate(infos):
                cid = check_id(info.node_id, index)
                if self._metas.get(index) != info.to_meta():
                    await self._register(index, info)
                if healthy:
                    known = await self._consul.agent.check.ttl_pass(
                        cid, notes=note or None
                    )
                else:
                    known = await self._consul.agent.check.ttl_fail(
                        cid, notes=note or "unhealthy"
                    )
                if not known:
                    # The agent forgot us (restarted): register again next time.
                    self._metas.pop(index, None)
        except consul_errors() as exc:
            log.warning("cannot reach Consul at %s: %s", self._consul_url, exc)

    async def withdraw(self) -> None:
        """Stop announcing: delete the Redis keys and deregister from Consul."""
        self._withdrawn = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        node_id = self._node_id
        try:
            for index in range(max(self._count, 1)):
                await withdraw_node(self._redis, announcement_id(node_id, index))
        except (RedisError, OSError) as exc:
            log.warning("cannot delete the node key: %s", exc)
        if self._consul is not None:
            for index in sorted(self._metas):
                try:
                    await self._consul.agent.service.deregister(
                        service_id(node_id, index)
                    )
                    log.info("deregistered %s from Consul", service_id(node_id, index))
                except consul_errors() as exc:
                    log.warning("cannot deregister from Consul: %s", exc)
            self._metas.clear()

    async def close(self) -> None:
        """Withdraw and close the Consul client."""
        await self.withdraw()
        if self._consul is not None:
            await self._consul.close()
            self._consul = None

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


def service_id(node_id: str) -> str:
    """Consul service id of a node."""
    return f"{GPU_SERVICE}-{node_id}"


def check_id(node_id: str) -> str:
    """The id Consul gives the single check of a node's service."""
    return f"service:{service_id(node_id)}"


class Announcer:
    """Keeps the node's Redis key and Consul TTL check fresh while it is healthy."""

    def __init__(
        self,
        redis_client: Redis,
        info: NodeInfo,
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
        self.info = info
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
        self._registered = False
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
        """Refresh the Redis key and the Consul check once."""
        if self._withdrawn:
            return
        try:
            await announce_node(self._redis, self.info, self._redis_ttl_s)
            self.redis_ok = True
        except (RedisError, OSError) as exc:
            self.redis_ok = False
            log.warning("cannot announce the node in Redis: %s", exc)
        if self._consul is not None:
            await self._refresh_consul()

    async def update(self, info: NodeInfo) -> None:
        """Announce `info` from now on (registered again in Consul: new Meta)."""
        self.info = info
        self._registered = False
        await self.announce()

    async def _register(self) -> None:
        sid = service_id(self.info.node_id)
        check = {
            "Name": f"{GPU_SERVICE} worker alive",
            "TTL": f"{self._ttl_s}s",
            "DeregisterCriticalServiceAfter": f"{self._deregister_after_s}s",
            "Notes": "passed by the node while its worker runs",
        }
        await self._consul.agent.service.register(
            GPU_SERVICE,
            service_id=sid,
            address=self._address,
            port=self._port,
            tags=[f"model:{self.info.model}"],
            meta=self.info.to_meta(),
            check=check,
        )
        self._registered = True
        log.info("registered %s in Consul (check %s)", sid, check_id(self.info.node_id))

    async def _refresh_consul(self) -> None:
        healthy, note = self._health()
        healthy = healthy and self.redis_ok
        cid = check_id(self.info.node_id)
        try:
            if not self._registered:
                await self._register()
            if healthy:
                known = await self._consul.agent.check.ttl_pass(cid, notes=note or None)
            else:
                known = await self._consul.agent.check.ttl_fail(
                    cid, notes=note or "unhealthy"
                )
            if not known:
                # The agent forgot us (restarted): register again next time.
                self._registered = False
        except consul_errors() as exc:
            log.warning("cannot reach Consul at %s: %s", self._consul_url, exc)

    async def withdraw(self) -> None:
        """Stop announcing: delete the Redis key and deregister from Consul."""
        self._withdrawn = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await withdraw_node(self._redis, self.info.node_id)
        except (RedisError, OSError) as exc:
            log.warning("cannot delete the node key: %s", exc)
        if self._consul is not None and self._registered:
            try:
                await self._consul.agent.service.deregister(
                    service_id(self.info.node_id)
                )
                log.info("deregistered %s from Consul", service_id(self.info.node_id))
            except consul_errors() as exc:
                log.warning("cannot deregister from Consul: %s", exc)
            self._registered = False

    async def close(self) -> None:
        """Withdraw and close the Consul client."""
        await self.withdraw()
        if self._consul is not None:
            await self._consul.close()
            self._consul = None

"""GPU nodes' announcements in Redis (what `web` reads when there is no Consul).

Each node keeps its NodeInfo at `node_key(id)` with a TTL, and its id in one
sorted set scored by when that announcement expires, so listing the healthy
nodes costs one ZRANGE and one MGET however many other keys Redis holds (a
SCAN over every generation's events and images would not).
"""

from __future__ import annotations

import logging
import math
import time

from pydantic import ValidationError
from redis.asyncio import Redis

from sdapi.contract.names import NODE_TTL_S, NODES_INDEX, node_key
from sdapi.contract.nodes import NodeInfo

log = logging.getLogger(__name__)


def announcement_ttl_s(every_s: float) -> int:
    """TTL of an announcement refreshed every `every_s` s (two refreshes may fail)."""
    return max(NODE_TTL_S, math.ceil(3 * every_s))


async def announce_node(
    redis: Redis,
    info: NodeInfo,
    ttl_s: int = NODE_TTL_S,
    *,
    announcement_id: str | None = None,
) -> None:
    """Say (again) that `info`'s node is alive for the next `ttl_s` seconds.

    A node serving several models announces each under its own id
    (`announcement_id`; by default the node's id).
    """
    key = announcement_id or info.node_id
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(node_key(key), info.model_dump_json(), ex=ttl_s)
        pipe.zadd(NODES_INDEX, {key: time.time() + ttl_s})
        await pipe.execute()


async def withdraw_node(redis: Redis, node_id: str) -> None:
    """Take a node out of the registry at once (it is shutting down)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(node_key(node_id))
        pipe.zrem(NODES_INDEX, node_id)
        await pipe.execute()


async def live_nodes(redis: Redis) -> list[NodeInfo]:
    """Every node whose announcement has not expired."""
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zremrangebyscore(NODES_INDEX, "-inf", now)
        pipe.zrange(NODES_INDEX, 0, -1)
        _, members = await pipe.execute()
    if not members:
        return []
    ids = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
    values = await redis.mget([node_key(node_id) for node_id in ids])
    infos = []
    for value in values:
        if value is None:
            continue  # expired between the two reads
        try:
            infos.append(NodeInfo.model_validate_json(value))
        except ValidationError:
            log.warning("ignoring a malformed node announcement in Redis")
    return infos

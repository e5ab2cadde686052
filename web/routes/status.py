"""`GET /api/v1/status`: the work waiting per tier and model, and the GPU nodes."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from tortoise.functions import Count

from sdapi.contract.names import batch_queue, premium_queue
from sdapi.contract.status import ACTIVE_STATUSES, Status, Tier
from sdapi.db.models import Generation, utcnow
from sdapi.infra.queue import queue_depth
from web.appkeys import redis_key, registry_key
from web.openapi import ApiRoutes, Response, json_response
from web.schemas.status import ModelStatus, ServiceStatus, StatusCounts, TierQueue

routes = ApiRoutes(tags=["operations"])


async def _counts() -> dict[tuple[str, Tier], StatusCounts]:
    """Unfinished generations per (model, tier), by status."""
    rows: list[dict[str, Any]] = (
        await Generation.filter(status__in=list(ACTIVE_STATUSES))
        .annotate(count=Count("id"))
        .group_by("model", "tier", "status")
        .values("model", "tier", "status", "count")
    )
    counts: dict[tuple[str, Tier], StatusCounts] = {}
    for row in rows:
        entry = counts.setdefault((row["model"], Tier(row["tier"])), StatusCounts())
        setattr(entry, Status(row["status"]).value, int(row["count"]))
    return counts


@routes.route(
    "GET",
    "/api/v1/status",
    summary="Queue depths per tier and model, and healthy GPU nodes",
    responses=[Response(200, "The service's queues and nodes", ServiceStatus)],
)
async def service_status(request: web.Request) -> web.StreamResponse:
    """Jobs on each model's premium and batch queues, unfinished generations by
    tier and status, scheduled requests, and the healthy GPU nodes."""
    app = request.app
    redis = app[redis_key]
    offers = await app[registry_key].offers()
    counts = await _counts()
    models = sorted(set(offers) | {model for model, _ in counts})
    items = []
    for model in models:
        offer = offers.get(model)
        items.append(
            ModelStatus(
                model=model,
                available=offer.available if offer else False,
                nodes=offer.nodes if offer else 0,
                max_batch=offer.max_batch if offer else 0,
                premium=TierQueue(
                    jobs=await queue_depth(redis, premium_queue(model)),
                    generations=counts.get((model, Tier.PREMIUM), StatusCounts()),
                ),
                normal=TierQueue(
                    jobs=await queue_depth(redis, batch_queue(model)),
                    generations=counts.get((model, Tier.NORMAL), StatusCounts()),
                ),
            )
        )
    scheduled = sum(item.normal.generations.scheduled for item in items)
    due = await Generation.filter(
        status=Status.SCHEDULED, scheduled_for__lte=utcnow()
    ).count()
    body = ServiceStatus(
        models=items,
        healthy_nodes=sum(offer.nodes for offer in offers.values()),
        scheduled=scheduled,
        scheduled_due=due,
    )
    return json_response(body)

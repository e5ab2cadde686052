"""Health, readiness, metrics, models, the OpenAPI document and the docs page."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tortoise.functions import Count

from sdapi.contract.names import batch_queue, premium_queue
from sdapi.contract.status import Status, Tier
from sdapi.db.models import Generation
from sdapi.infra.queue import queue_depth
from sdapi.infra.registry import NodesUnknown
from web.appkeys import (
    database_key,
    metrics_key,
    openapi_key,
    readiness_key,
    redis_key,
    registry_key,
    settings_key,
)
from web.auth import bearer_secret
from web.errors import Forbidden, Unauthorized
from web.metrics import web_metrics_key
from web.openapi import ApiRoutes, ErrorBody, Response, json_response
from web.schemas.ops import Health, ModelList, Readiness

log = logging.getLogger(__name__)

routes = ApiRoutes(tags=["operations"])

READY_TIMEOUT_S = 2.0


@routes.route(
    "GET",
    "/healthz",
    summary="The process is alive",
    auth=False,
    responses=[Response(200, "Alive", Health)],
)
async def healthz(request: web.Request) -> web.StreamResponse:
    """Answers as long as the event loop runs; checks nothing else."""
    return json_response(Health())


async def _probe(
    request: web.Request, name: str, check: Callable[[], Awaitable[object]]
) -> bool:
    """Whether `check` succeeds within READY_TIMEOUT_S, however stalled the
    dependency: a probe that overruns is left to end in the background, and
    no second one of the same dependency starts while it does."""
    probes = request.app[readiness_key]
    pending = probes.pending.get(name)
    if pending is not None and not pending.done():
        ok = False
    else:
        task = asyncio.ensure_future(check())
        probes.pending[name] = task
        done, _ = await asyncio.wait({task}, timeout=READY_TIMEOUT_S)
        if not done:
            task.cancel()
            ok = False
        else:
            ok = task.exception() is None
    if probes.last.get(name, True) != ok:
        # One line per change of state, never a traceback per probe.
        if ok:
            log.info("readiness: %s answers again", name)
        else:
            log.warning("readiness: %s does not answer", name)
    probes.last[name] = ok
    return ok


@routes.route(
    "GET",
    "/readyz",
    summary="The database and Redis are reachable",
    auth=False,
    responses=[
        Response(200, "Ready", Readiness),
        Response(503, "A dependency is unreachable", Readiness),
    ],
)
async def readyz(request: web.Request) -> web.StreamResponse:
    """Ready when both PostgreSQL and Redis answer within two seconds."""
    app = request.app
    database, redis = await asyncio.gather(
        _probe(
            request,
            "database",
            lambda: app[database_key].db().execute_query("SELECT 1"),
        ),
        _probe(request, "redis", app[redis_key].ping),
    )
    ready = database and redis
    body = Readiness(
        status="ready" if ready else "unready",
        database=database,
        redis=redis,
        consul=request.app[registry_key].consul_ok,
    )
    return json_response(body, status=200 if ready else 503)


@routes.route(
    "GET",
    "/metrics",
    summary="Prometheus metrics",
    auth=False,
    responses=[
        Response(200, "Prometheus text format", content_type="text/plain"),
        Response(401, "SDAPI_METRICS_TOKEN is set and was not sent", ErrorBody),
        Response(403, "Without SDAPI_METRICS_TOKEN: not from this host", ErrorBody),
    ],
)
async def metrics(request: web.Request) -> web.StreamResponse:
    """Request counts and latencies, queue depths per model and tier, nodes,
    and normal-tier generations waiting for their window per model. With
    SDAPI_METRICS_TOKEN set, only for that bearer token; else for this host."""
    _check_scraper(request)
    app = request.app
    gauges = app[web_metrics_key]
    try:
        offers = await app[registry_key].offers()
    except NodesUnknown:
        # Consul never answered yet: the request metrics still go out.
        offers = {}
    scheduled = await _scheduled_per_model()
    redis = app[redis_key]
    models = sorted(set(offers) | set(scheduled))
    depths = {
        model: (
            await queue_depth(redis, premium_queue(model)),
            await queue_depth(redis, batch_queue(model)),
        )
        for model in models
    }
    # Cleared, then set with no await in between: a model that went away
    # leaves no stale series, and a concurrent scrape never sees half a set.
    for gauge in (gauges.healthy_nodes, gauges.queue_depth, gauges.scheduled):
        gauge.clear()
    for model in models:
        offer = offers.get(model)
        gauges.healthy_nodes.labels(model).set(offer.nodes if offer else 0)
        premium, normal = depths[model]
        gauges.queue_depth.labels(model, "premium").set(premium)
        gauges.queue_depth.labels(model, "normal").set(normal)
        gauges.scheduled.labels(model).set(scheduled.get(model, 0))
    body = generate_latest(app[metrics_key])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _check_scraper(request: web.Request) -> None:
    token = request.app[settings_key].metrics_token
    if token is not None:
        sent = bearer_secret(request) or ""
        if not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
            raise Unauthorized("Send the metrics token as a bearer token.")
        return
    try:
        local = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        local = False
    if not local:
        raise Forbidden(
            "Metrics are served to this host only; set SDAPI_METRICS_TOKEN to "
            "let a scraper elsewhere read them."
        )


async def _scheduled_per_model() -> dict[str, int]:
    """Normal-tier generations waiting in the database for their window."""
    rows: list[dict[str, Any]] = (
        await Generation.filter(status=Status.SCHEDULED, tier=Tier.NORMAL)
        .annotate(count=Count("id"))
        .group_by("model")
        .values("model", "count")
    )
    return {str(row["model"]): int(row["count"]) for row in rows}


@routes.route(
    "GET",
    "/api/v1/models",
    summary="Models that healthy GPU nodes serve",
    responses=[Response(200, "Models with their defaults and limits", ModelList)],
    tags=["models"],
)
async def list_models(request: web.Request) -> web.StreamResponse:
    """Each model with its defaults and limits; `available` is false while no
    healthy node serves it (normal-tier requests for it wait in the database)."""
    offers = await request.app[registry_key].offers()
    return json_response(ModelList(items=list(offers.values())))


@routes.route(
    "GET",
    "/openapi.json",
    summary="This API's OpenAPI 3.1 document",
    auth=False,
    responses=[Response(200, "OpenAPI 3.1 document", content_type="application/json")],
)
async def openapi_document(request: web.Request) -> web.StreamResponse:
    """Generated from the routes' pydantic models at start-up."""
    return web.json_response(request.app[openapi_key])


@routes.route(
    "GET",
    "/docs",
    summary="Interactive API documentation",
    auth=False,
    responses=[Response(200, "Swagger UI", content_type="text/html")],
    hidden=True,
)
async def docs(request: web.Request) -> web.StreamResponse:
    """Swagger UI from the packaged bundle: works without internet."""
    settings = request.app[settings_key]
    return aiohttp_jinja2.render_template(
        "docs.html.j2", request, {"title": "sdapi API", "base_url": settings.base_url}
    )


@routes.route(
    "GET",
    "/docs/init.js",
    summary="The docs page's start-up script",
    auth=False,
    responses=[Response(200, "JavaScript", content_type="text/javascript")],
    hidden=True,
)
async def docs_script(request: web.Request) -> web.StreamResponse:
    """Starts Swagger UI on /openapi.json."""
    script = aiohttp_jinja2.render_string("docs-init.js", request, {})
    return web.Response(text=script, content_type="text/javascript")

"""Prometheus metrics of the web process, on the app's own registry."""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from web.appkeys import metrics_key
from web.errors import Handler


@dataclass(frozen=True)
class WebMetrics:
    requests: Counter
    latency: Histogram
    queue_depth: Gauge
    scheduled: Gauge
    healthy_nodes: Gauge


web_metrics_key = web.AppKey("web_metrics", WebMetrics)


def install_metrics(app: web.Application) -> None:
    """Create the metrics on the app's registry."""
    registry: CollectorRegistry = app[metrics_key]
    app[web_metrics_key] = WebMetrics(
        requests=Counter(
            "sdapi_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=registry,
        ),
        latency=Histogram(
            "sdapi_http_request_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            registry=registry,
        ),
        # Exported for the GPU nodes' Nomad scaling policy.
        queue_depth=Gauge(
            "sdapi_queue_depth",
            "Generations waiting or running on a GPU queue",
            ["model", "tier"],
            registry=registry,
        ),
        scheduled=Gauge(
            "sdapi_scheduled_generations",
            "Normal-tier generations waiting in the database for their window",
            ["model"],
            registry=registry,
        ),
        healthy_nodes=Gauge(
            "sdapi_healthy_gpu_nodes",
            "GPU nodes that pass their health check, by model",
            ["model"],
            registry=registry,
        ),
    )


@web.middleware
async def metrics_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Count requests and time them by route template (not by raw path)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics = request.app[web_metrics_key]
        metrics.requests.labels(request.method, route, str(status)).inc()
        metrics.latency.labels(request.method, route).observe(
            time.perf_counter() - started
        )

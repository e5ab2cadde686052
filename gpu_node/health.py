"""`/healthz` and `/metrics` of a node on a small HTTP port."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from aiohttp.web import (
    AppKey,
    Application,
    AppRunner,
    Request,
    Response,
    TCPSite,
    json_response,
)
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

log = logging.getLogger(__name__)


class NodeMetrics:
    """The node's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.model_loaded = Gauge(
            "sdapi_gpu_model_loaded",
            "1 while the model is loaded in device memory",
            ["model"],
            registry=registry,
        )
        self.model_loads = Counter(
            "sdapi_gpu_model_loads",
            "Models loaded into device memory (at start and on demand)",
            ["model"],
            registry=registry,
        )
        self.model_load_seconds = Histogram(
            "sdapi_gpu_model_load_seconds",
            "Time to load a model into device memory",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160),
            registry=registry,
        )
        self.queue_wait = Histogram(
            "sdapi_gpu_queue_wait_seconds",
            "Time from enqueue to the node starting the job",
            ["tier"],
            buckets=(
                0.01,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
                300,
                1800,
                7200,
            ),
            registry=registry,
        )
        self.generations = Counter(
            "sdapi_gpu_generations",
            "Generations finished by this node",
            ["tier", "status"],
            registry=registry,
        )
        self.images = Counter(
            "sdapi_gpu_images", "Images made", ["tier"], registry=registry
        )
        self.steps = Counter(
            "sdapi_gpu_steps",
            "Denoising steps run (one per call, any batch size)",
            registry=registry,
        )
        self.steps_per_second = Gauge(
            "sdapi_gpu_steps_per_second",
            "Denoising steps per second of the last call",
            registry=registry,
        )
        self.images_per_second = Gauge(
            "sdapi_gpu_images_per_second",
            "Images per second of the last call",
            registry=registry,
        )
        self.call_seconds = Histogram(
            "sdapi_gpu_call_seconds",
            "Duration of one pipeline call",
            ["tier"],
            buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
            registry=registry,
        )
        self.memory = Gauge(
            "sdapi_gpu_memory_bytes",
            "Device memory (allocated, reserved, peak, total)",
            ["kind"],
            registry=registry,
        )
        self.busy = Gauge(
            "sdapi_gpu_busy", "1 while a pipeline call runs", registry=registry
        )

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        data: bytes = generate_latest(self.registry)
        return data


class HealthSource(Protocol):
    """What the health endpoints ask of a node."""

    @property
    def metrics(self) -> NodeMetrics: ...

    def health(self) -> tuple[bool, dict[str, Any]]: ...

    def refresh_metrics(self) -> None: ...


source_key = AppKey("source", HealthSource)


async def healthz(request: Request) -> Response:
    """200 while the node can take work, 503 otherwise, with details."""
    ok, details = request.app[source_key].health()
    return json_response(details, status=200 if ok else 503)


async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    source = request.app[source_key]
    source.refresh_metrics()
    return Response(
        body=source.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def create_health_app(source: HealthSource) -> Application:
    """The node's small HTTP app."""
    app = Application()
    app[source_key] = source
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_health_server(
    source: HealthSource, host: str, port: int
) -> tuple[AppRunner, int]:
    """Serve the health app; returns the runner and the port (0 picks one)."""
    runner = AppRunner(create_health_app(source), access_log=None)
    await runner.setup()
    site = TCPSite(runner, host, port)
    await site.start()
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound = int(address[1])
            break
    return runner, bound

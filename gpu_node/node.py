"""The node: two queue workers (premium first, then batches) feeding one GPU thread.

`GpuNode.start()` opens the resources (model, Redis pool, GPU executor,
publisher, health server, announcements), `serve()` runs the workers until
`request_stop()`, then drains; `close()` releases everything. Torch is loaded
only through `gpu_node.pipeline` (and `gpu_node.tiny` to build the tiny
model), imported when a model is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gpu_node.announcer import Announcer
from gpu_node.calls import Engine
from gpu_node.executor import GpuExecutor
from gpu_node.health import NodeMetrics, start_health_server
from gpu_node.lora_watch import watch_loras
from gpu_node.loras import LoraFolder
from gpu_node.progress import CancelWatch, EventPublisher
from gpu_node.resources import NodeResources
from gpu_node.settings import GpuNodeSettings
from gpu_node.tasks import NodeTasks
from sdapi.contract.names import (
    BATCH_FUNCTION,
    CANCEL_CHANNEL,
    GENERATE_FUNCTION,
    batch_queue,
    premium_queue,
    wake_channel,
)
from sdapi.contract.nodes import NodeInfo
from sdapi.contract.payloads import JOB_TIMEOUT_MAX_S
from sdapi.infra.pubsub import Listener, setter
from sdapi.infra.queue import (
    QueuePool,
    QueueWorker,
    Task,
    create_queue_pool,
    new_worker,
    poll_when_woken,
    run_worker,
    running_jobs,
    stop_taking_jobs,
    wake_after_job,
)

log = logging.getLogger(__name__)

# The queue's own limit per job, past the largest `job_timeout_s`: each job
# enforces its own, derived from its size, and stops its pipeline call at a
# step boundary when it runs out.
QUEUE_TIMEOUT_S = JOB_TIMEOUT_MAX_S + 300
# A finished job's result is kept this long; it also dedupes its job id.
KEEP_RESULT_S = 3600


def _build_tiny_model(folder: Path) -> None:
    from gpu_node import tiny

    tiny.build_tiny_model(folder)


def load_model_engine(settings: GpuNodeSettings) -> Engine:
    """Prepare and load SDAPI_MODEL (blocking: downloads, builds, loads)."""
    from gpu_node import weights

    location = weights.locate_model(
        settings.model, settings.models_path, settings.model_name
    )
    # Fails fast, before torch loads, when the model cannot be had or is
    # pickled (torch is imported only to build the tiny model).
    weights.prepare_model(location, _build_tiny_model)
    # diffusers' pipelines import CLIPImageProcessor; without torchvision (a
    # node needs none) transformers warns at every start that it uses the PIL
    # version instead, which is the one we want. Its other warnings stay.
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
    from gpu_node import pipeline

    return pipeline.load_engine(
        location,
        on_phase=lambda phase: log.info("model %s: %s", location.model_id, phase),
        device=settings.gpu_device,
        max_size=settings.gpu_max_size,
        default_steps=settings.gpu_default_steps,
        default_scheduler=settings.gpu_default_scheduler,
    )


class GpuNode:
    """One model on one device behind its premium and batch queues."""

    def __init__(
        self, settings: GpuNodeSettings, redis_url: str, *, engine: Engine | None = None
    ) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.metrics = NodeMetrics()
        self._engine = engine
        self._resources: NodeResources | None = None
        self._workers: list[QueueWorker] = []
        self._tasks: NodeTasks | None = None
        self._closing: contextlib.AsyncExitStack | None = None
        self._stop = asyncio.Event()
        self._wakeups: dict[str, asyncio.Event] = {}
        self._draining = False
        self.failed = False

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    @property
    def resources(self) -> NodeResources:
        if self._resources is None:
            raise RuntimeError("the node is not started")
        return self._resources

    @property
    def info(self) -> NodeInfo:
        return self.resources.info

    @property
    def tasks(self) -> NodeTasks:
        if self._tasks is None:
            raise RuntimeError("the node is not started")
        return self._tasks

    async def start(self) -> None:
        """Load the model and open every resource."""
        # Each resource is registered for closing as soon as it is open: a
        # start that fails half-way (say, the health port is taken) releases
        # what it opened instead of leaking a pool, a thread and tasks.
        stack = contextlib.AsyncExitStack()
        try:
            self._resources = await self._open(stack)
            await self._resources.announcer.start()
        except BaseException:
            self._resources = None
            await stack.aclose()
            raise
        self._closing = stack
        info = self._resources.info
        log.info(
            "gpu node %s: model %s (%s, weights %s) on %s, max batch %d, health %s",
            self.node_id,
            info.model,
            info.pipeline,
            info.model_hash[:12],
            info.device,
            info.max_batch,
            info.health_url,
        )

    async def _open(self, stack: contextlib.AsyncExitStack) -> NodeResources:
        settings = self.settings
        engine = self._engine
        if engine is None:
            engine = await asyncio.to_thread(load_model_engine, settings)
        profile = engine.profile
        self.metrics.model_loaded.labels(profile.model).set(1)
        stack.callback(self.metrics.model_loaded.clear)
        redis = await create_queue_pool(self.redis_url)
        stack.push_async_callback(redis.aclose)
        executor = GpuExecutor(name=f"gpu-{profile.model}")
        stack.push_async_callback(asyncio.to_thread, executor.shutdown)
        publisher = EventPublisher(redis)
        publisher.start()
        stack.push_async_callback(publisher.close)
        cancels = CancelWatch(redis)
        runner, port = await start_health_server(
            self, settings.gpu_health_host, settings.gpu_health_port
        )
        stack.push_async_callback(runner.cleanup)
        max_batch = settings.gpu_max_batch or profile.limits.max_batch
        lora_folder = LoraFolder(settings.lora_path)
        await asyncio.to_thread(lora_folder.scan)
        info = NodeInfo(
            node_id=self.node_id,
            model=profile.model,
            model_hash=profile.model_hash,
            pipeline=profile.pipeline,
            device=profile.device,
            memory_bytes=profile.memory_bytes,
            health_url=f"http://{settings.advertise_host}:{port}/healthz",
            lora_kind=profile.lora_kind,
            loras=lora_folder.offers(),
            **dict(profile.limits.model_copy(update={"max_batch": max_batch})),
        )
        announcer = Announcer(
            redis,
            info,
            every_s=settings.gpu_announce_every_s,
            consul_url=settings.consul_url,
            ttl_s=settings.gpu_consul_ttl_s,
            deregister_after_s=settings.gpu_consul_deregister_after_s,
            address=settings.advertise_host,
            port=port,
            health=self._liveness,
        )
        stack.push_async_callback(announcer.close)
        resources = NodeResources(
            settings=settings,
            metrics=self.metrics,
            redis=redis,
            engine=engine,
            executor=executor,
            publisher=publisher,
            cancels=cancels,
            announcer=announcer,
            info=info,
            loras=lora_folder,
        )
        tasks = self._tasks = NodeTasks(resources)
        premium, batch = premium_queue(profile.model), batch_queue(profile.model)
        self._wakeups = {premium: asyncio.Event(), batch: asyncio.Event()}
        self._workers = [
            self._worker(redis, premium, GENERATE_FUNCTION, tasks.generate, True),
            self._worker(redis, batch, BATCH_FUNCTION, tasks.generate_batch, False),
        ]
        handlers = {
            wake_channel(queue): setter(event) for queue, event in self._wakeups.items()
        }
        handlers[CANCEL_CHANNEL] = lambda data: cancels.note(data.decode())
        listener = Listener(redis, handlers)
        background = [
            asyncio.create_task(listener.run(), name="pubsub"),
            asyncio.create_task(cancels.run(), name="cancel-recheck"),
            asyncio.create_task(watch_loras(resources), name="lora-scan"),
        ]
        stack.push_async_callback(_cancel_tasks, background)
        return resources

    def _worker(
        self,
        redis: QueuePool,
        queue: str,
        name: str,
        coroutine: Callable[[dict[str, Any], Any], Awaitable[str]],
        premium: bool,
    ) -> QueueWorker:
        settings = self.settings
        return new_worker(
            [Task(name, coroutine, settings.gpu_max_tries, QUEUE_TIMEOUT_S)],
            queue=queue,
            # A SIGKILLed node's job is free again after one lease, not after
            # the queue's timeout; the running job renews its lease.
            claim_s=settings.gpu_job_lease_s,
            redis_pool=redis,
            handle_signals=False,
            # One job at a time per queue: jobs left in Redis stay free for other
            # nodes, and the GPU thread runs one call at a time anyway.
            max_jobs=1,
            poll_delay=settings.gpu_premium_poll_s
            if premium
            else settings.gpu_batch_poll_s,
            keep_result=KEEP_RESULT_S,
            max_tries=settings.gpu_max_tries,
            health_check_interval=60,
            health_check_key=f"{queue}:health-check:{self.node_id}",
            after_job_end=wake_after_job(self._wakeups[queue]),
            ctx={},
            log_results=False,
        )

    def request_stop(self) -> None:
        """Begin a graceful stop (signal handlers call this)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def serve(self) -> None:
        """Run both workers until `request_stop()`, then drain and return."""
        workers = self._workers
        loops = [
            asyncio.create_task(
                self._supervise(worker), name=f"queue:{worker.queue_name}"
            )
            for worker in workers
        ] + [
            asyncio.create_task(
                poll_when_woken(worker, self._wakeups[worker.queue_name]),
                name=f"wake:{worker.queue_name}",
            )
            for worker in workers
        ]
        try:
            await self._stop.wait()
        finally:
            await self._drain(workers, loops)

    async def _supervise(self, worker: QueueWorker) -> None:
        try:
            await run_worker(worker)
        except Exception:
            # A bug: stop the node (exit 1) rather than keep announcing a node
            # that no longer serves this queue.
            log.exception("queue %s: worker crashed", worker.queue_name)
            self.failed = True
            self.request_stop()

    async def _drain(
        self, workers: list[QueueWorker], loops: list[asyncio.Task[None]]
    ) -> None:
        self._draining = True
        running = [task for worker in workers for task in running_jobs(worker)]
        log.info("draining: %d job(s) running, no new jobs taken", len(running))
        for worker in workers:
            stop_taking_jobs(worker)
        # Let a poll iteration that is claiming a job finish claiming it.
        await asyncio.sleep(
            max(self.settings.gpu_premium_poll_s, self.settings.gpu_batch_poll_s) + 0.05
        )
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await self.resources.announcer.withdraw()
        running = [task for worker in workers for task in running_jobs(worker)]
        if running:
            _, pending = await asyncio.wait(
                running, timeout=self.settings.gpu_drain_grace_s
            )
            if pending:
                log.warning("drain grace over: re-queueing %d job(s)", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
        log.info("drained")

    async def close(self) -> None:
        """Release every resource."""
        closing, self._closing = self._closing, None
        self._resources = None
        self._workers = []
        self._tasks = None
        if closing is not None:
            await closing.aclose()

    # --- health ------------------------------------------------------------

    def _liveness(self) -> tuple[bool, str]:
        resources = self._resources
        if resources is None or self._draining or self.stopping:
            return False, "draining"
        if not resources.executor.alive:
            return False, "GPU thread stopped"
        if not resources.publisher.alive:
            return False, "event publisher stopped"
        return True, ""

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the node can take work, and why not."""
        resources = self._resources
        if resources is None:
            return False, {"status": "starting", "node_id": self.node_id}
        alive, note = self._liveness()
        redis_ok = resources.announcer.redis_ok
        status = "ok" if alive and redis_ok else (note or "redis unavailable")
        return alive and redis_ok, {
            "status": status,
            "node_id": self.node_id,
            "model": resources.info.model,
            "model_loaded": True,
            "device": resources.info.device,
            "max_batch": resources.info.max_batch,
            "busy": resources.executor.busy,
            "redis": redis_ok,
        }

    def refresh_metrics(self) -> None:
        """Update gauges read at scrape time."""
        resources = self._resources
        if resources is None:
            return
        # torch's allocator counters are plain reads: no device sync, no wait.
        for kind, value in resources.engine.memory_stats().items():
            self.metrics.memory.labels(kind).set(value)
        self.metrics.busy.set(1 if resources.executor.busy else 0)


async def _cancel_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def run_node(settings: GpuNodeSettings, redis_url: str) -> bool:
    """Start a node, serve until SIGTERM/SIGINT, drain, close; False if it failed."""
    import signal

    node = GpuNode(settings, redis_url)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, node.request_stop)
    try:
        await node.start()
        if not node.stopping:
            await node.serve()
    finally:
        await node.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return not node.failed

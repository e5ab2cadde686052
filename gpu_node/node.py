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

from gpu_node import residency
from gpu_node.announcer import Announcer
from gpu_node.calls import Engine, SharedComponents
from gpu_node.executor import GpuExecutor
from gpu_node.health import NodeMetrics, start_health_server
from gpu_node.lora_watch import watch_loras
from gpu_node.loras import LoraFolder
from gpu_node.progress import CancelWatch, EventPublisher
from gpu_node.residency import ModelResidency
from gpu_node.resources import NodeResources
from gpu_node.settings import GpuNodeSettings
from gpu_node.speed import SpeedBook
from gpu_node.tasks import NodeTasks
from gpu_node.weights import ModelLocation
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
    is_running,
    jobs_due,
    new_worker,
    poll_when_woken,
    queue_depth,
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


def prepare_models(settings: GpuNodeSettings) -> list[ModelLocation]:
    """Find and ready every catalogue model (blocking: downloads, builds)."""
    from gpu_node import weights

    locations = residency.locate(settings)
    for location in locations:
        # Fails fast, before torch loads, when a model cannot be had or is
        # pickled (torch is imported only to build the tiny model).
        weights.prepare_model(location, _build_tiny_model)
    return locations


def engine_loader(settings: GpuNodeSettings) -> residency.Loader:
    """Loads one prepared model with the node's settings (blocking)."""

    def load(location: ModelLocation, shared: SharedComponents) -> Engine:
        # diffusers' pipelines import CLIPImageProcessor; without torchvision
        # (a node needs none) transformers warns at every start that it uses
        # the PIL version instead, which is the one we want.
        logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
        from gpu_node import pipeline

        return pipeline.load_engine(
            location,
            on_phase=lambda phase: log.info("model %s: %s", location.model_id, phase),
            device=settings.gpu_device,
            max_size=settings.gpu_max_size,
            default_steps=settings.gpu_default_steps,
            default_scheduler=settings.gpu_default_scheduler,
            shared=shared,
        )

    return load


def load_model_engine(settings: GpuNodeSettings) -> Engine:
    """Prepare and load the node's first model (blocking)."""
    location = prepare_models(settings)[0]
    return engine_loader(settings)(location, SharedComponents({}, {}))


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
        self._claim_locks: dict[bool, asyncio.Lock] = {}
        self._models: ModelResidency
        self._health_url = ""
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
        """The announcement of the node's first model, as it is now."""
        self.resources  # noqa: B018 - raises before the start
        return self.model_infos()[0]

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
        others = self.model_infos()[1:]
        if others:
            log.info(
                "also serving %s",
                ", ".join(
                    f"{i.model} ({i.kind or 'unknown kind'}, "
                    f"{'loaded' if i.loaded else 'on disk'})"
                    for i in others
                ),
            )

    async def _open(self, stack: contextlib.AsyncExitStack) -> NodeResources:
        settings = self.settings
        locations = await asyncio.to_thread(prepare_models, settings)
        executor = GpuExecutor(name="gpu")
        stack.push_async_callback(asyncio.to_thread, executor.shutdown)
        speeds = SpeedBook(self.node_id)
        models = ModelResidency(
            settings,
            locations,
            executor,
            self.metrics,
            engine_loader(settings),
            on_loaded=speeds.observe_load,
        )
        await asyncio.to_thread(models.inspect)
        stack.callback(self.metrics.model_loaded.clear)
        if self._engine is not None and self._engine.profile.model in models.slots:
            models.adopt(self._engine)
        # The first model loads at start (a node that cannot serve it fails
        # fast), then the others while they fit the memory budget.
        async with models.using(models.primary, premium=False):
            pass
        await models.preload()
        redis = await create_queue_pool(self.redis_url)
        stack.push_async_callback(redis.aclose)
        # The loads just measured, before the node announces itself.
        await speeds.publish(redis)
        publisher = EventPublisher(redis)
        publisher.start()
        stack.push_async_callback(publisher.close)
        cancels = CancelWatch(redis)
        runner, port = await start_health_server(
            self, settings.gpu_health_host, settings.gpu_health_port
        )
        stack.push_async_callback(runner.cleanup)
        self._health_url = f"http://{settings.advertise_host}:{port}/healthz"
        self._models = models
        self._loras = LoraFolder(settings.lora_path)
        await asyncio.to_thread(self._loras.scan)
        announcer = Announcer(
            redis,
            self.model_infos,
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
            models=models,
            executor=executor,
            publisher=publisher,
            cancels=cancels,
            announcer=announcer,
            info=self.model_infos()[0],
            loras=self._loras,
            speeds=speeds,
        )
        tasks = self._tasks = NodeTasks(resources)
        # One premium and one batch job at a time on the node, whatever the
        # model: each tier's workers take turns claiming (`_claim_gate`).
        self._claim_locks = {True: asyncio.Lock(), False: asyncio.Lock()}
        self._wakeups = {}
        self._workers = []
        for model in models.slots:
            premium, batch = premium_queue(model), batch_queue(model)
            self._wakeups[premium] = asyncio.Event()
            self._wakeups[batch] = asyncio.Event()
            self._workers += [
                self._worker(
                    redis, model, premium, GENERATE_FUNCTION, tasks.generate, True
                ),
                self._worker(
                    redis, model, batch, BATCH_FUNCTION, tasks.generate_batch, False
                ),
            ]
        handlers = {
            wake_channel(queue): setter(event) for queue, event in self._wakeups.items()
        }
        handlers[CANCEL_CHANNEL] = lambda data: cancels.note(data.decode())
        listener = Listener(redis, handlers)
        background = [
            asyncio.create_task(listener.run(), name="pubsub"),
            asyncio.create_task(cancels.run(), name="cancel-recheck"),
            asyncio.create_task(self._announce_changes(), name="residency"),
            asyncio.create_task(watch_loras(resources), name="lora-scan"),
        ]
        stack.push_async_callback(_cancel_tasks, background)
        return resources

    def model_infos(self) -> list[NodeInfo]:
        """What the node announces: one entry per model, the primary first."""
        models = self._models
        settings = self.settings
        primary = models.profile(models.primary)
        if primary is None:
            raise RuntimeError("the primary model is not loaded")
        infos = []
        for name, slot in models.slots.items():
            profile = slot.profile
            limits = models.limits(name, settings.gpu_max_batch)
            infos.append(
                NodeInfo(
                    node_id=self.node_id,
                    model=name,
                    model_hash=profile.model_hash if profile else "",
                    pipeline=profile.pipeline
                    if profile
                    else ("sdxl" if slot.kind.startswith("sdxl") else "sd"),
                    device=primary.device,
                    memory_bytes=primary.memory_bytes,
                    health_url=self._health_url,
                    kind=slot.kind,
                    loaded=models.loaded(name),
                    lora_kind=profile.lora_kind if profile else "",
                    loras=self._loras.offers(),
                    **dict(limits),
                )
            )
        return infos

    async def _announce_changes(self) -> None:
        """Announce at once when a model was loaded or unloaded."""
        models = self._models
        while True:
            await models.changed.wait()
            models.changed.clear()
            await self.resources.announcer.announce()

    async def _claim_gate(self, model: str, premium: bool) -> float | None:
        """How long a job must have waited before this worker claims it;
        None: claim nothing now."""
        running = any(is_running(worker) for worker in self._tier_workers(premium))
        if running:
            return None
        models = self._models
        # Premium first across models: while the premium tier is free and a
        # premium job of any model waits here, a batch would take the device
        # (a load, the first steps) ahead of it; let the premium worker claim.
        if (
            not premium
            and not any(is_running(worker) for worker in self._tier_workers(True))
            and await jobs_due(
                self.resources.redis, [premium_queue(name) for name in models.slots]
            )
        ):
            return None
        if models.loaded(model) or len(models.slots) == 1:
            return 0.0
        settings = self.settings
        # A node with the model loaded takes it first; while a loaded model
        # has work of this tier queued here, stay on it for a while.
        for other in models.slots:
            if other != model and models.loaded(other):
                queue = premium_queue(other) if premium else batch_queue(other)
                if await queue_depth(self.resources.redis, queue) > 0:
                    return max(
                        settings.gpu_cold_claim_delay_s, settings.gpu_switch_after_s
                    )
        return settings.gpu_cold_claim_delay_s

    def _tier_workers(self, premium: bool) -> list[QueueWorker]:
        # Workers alternate premium, batch per model (see `_open`).
        return self._workers[0 if premium else 1 :: 2]

    def _worker(
        self,
        redis: QueuePool,
        model: str,
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
            claim_gate=lambda: self._claim_gate(model, premium),
            claim_lock=self._claim_locks[premium],
            # Premium queues are served in fair order (`enqueue_generation`);
            # the gate's wait is then measured from each job's enqueue time.
            fair=premium,
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
            "models": {
                name: resources.models.loaded(name) for name in resources.models.slots
            },
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
        engines = [s.engine for s in resources.models.slots.values() if s.engine]
        # The device is shared: any loaded engine reads the same counters.
        stats = engines[0].memory_stats() if engines else {}
        for kind, value in stats.items():
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

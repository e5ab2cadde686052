"""The node: two arq workers (premium first, then batches) feeding one GPU thread.

`GpuNode.start()` opens the resources (model, Redis pool, GPU executor,
publisher, health server, announcements), `serve()` runs the workers until
`request_stop()`, then drains; `close()` releases everything. Torch is loaded
only through `gpu_node.pipeline`, imported when a model is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast
from uuid import UUID

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.worker import Retry, Worker, func
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpu_node.announcer import Announcer
from gpu_node.executor import GpuExecutor
from gpu_node.health import NodeMetrics, start_health_server
from gpu_node.images import ImageManifest, encode_png, sha256_hex
from gpu_node.progress import CallObserver, CancelWatch, EventPublisher, ItemProgress
from gpu_node.schemas import (
    BATCH_FUNCTION,
    CANCEL_CHANNEL,
    GENERATE_FUNCTION,
    IMAGE_TTL_S,
    JOB_TIMEOUT_MAX_S,
    MARK_STARTED_FUNCTION,
    RESULTS_QUEUE,
    STORE_RESULT_FUNCTION,
    BatchJob,
    ErrorInfo,
    GenerationJob,
    GenerationParams,
    GenerationResult,
    ImageEvent,
    ImageInfo,
    NodeInfo,
    StartedEvent,
    StartedNotice,
    Status,
    Tier,
    batch_queue,
    image_key,
    job_timeout_s,
    premium_queue,
    result_job_id,
    started_job_id,
    wake_channel,
)
from gpu_node.settings import GpuNodeSettings
from gpu_node.work import CallItem, CallStopped, Engine, OutOfMemory, PipelineCall
from sdapi.listener import Listener, poll_when_woken, setter, wake_after_job
from sdapi.queue import (
    create_queue_pool,
    deserialize,
    enqueue,
    serialize,
)

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

T = TypeVar("T")

# arq 0.28 has one timeout per function, not per job: set it past the largest
# `job_timeout_s`; each job enforces its own limit, derived from its size,
# and stops its pipeline call at a step boundary when it runs out.
ARQ_FUNCTION_TIMEOUT_S = JOB_TIMEOUT_MAX_S + 300
# arq keeps a finished job's result this long; it also dedupes its job id.
KEEP_RESULT_S = 3600


class InvalidPayload(ValueError):
    """A job payload failed validation: the job fails for good, no retry."""


def _now() -> datetime:
    return datetime.now(UTC)


def _normalize(text: str) -> str:
    return " ".join(text.split())


@dataclass
class _Prepared:
    """One generation of a job, checked and ready for the pipeline."""

    job: GenerationJob
    prompt: str
    negative_prompt: str
    prompt_dropped: int = 0
    negative_dropped: int = 0
    started_at: datetime | None = None
    images: list[Image] = field(default_factory=list)
    status: Status | None = None
    error: ErrorInfo | None = None

    @property
    def key(self) -> str:
        return str(self.job.generation_id)

    def fail(self, code: str, message: str) -> None:
        self.status = Status.FAILED
        self.error = ErrorInfo(code=code, message=message)


@dataclass
class NodeResources:
    """Everything a running node holds; opened in `start`, closed in `close`."""

    redis: ArqRedis
    engine: Engine
    executor: GpuExecutor
    publisher: EventPublisher
    cancels: CancelWatch
    announcer: Announcer
    health_url: str
    info: NodeInfo
    workers: list[Worker]


def _build_tiny_model(folder: Path) -> None:
    from gpu_node import pipeline

    pipeline.build_tiny_model(folder)


def load_model_engine(settings: GpuNodeSettings) -> Engine:
    """Prepare and load SDAPI_MODEL (blocking: downloads, builds, loads)."""
    from gpu_node import store

    location = store.locate_model(
        settings.model, settings.models_path, settings.model_name
    )
    # Fails fast, before torch loads, when the model cannot be had or is
    # pickled (torch is imported only to build the tiny model).
    store.prepare_model(location, _build_tiny_model)
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
        self._closing: contextlib.AsyncExitStack | None = None
        self._stop = asyncio.Event()
        self._wakeups: dict[str, asyncio.Event] = {}
        self._draining = False
        self.failed = False

    # --- life cycle --------------------------------------------------------

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

    async def start(self) -> None:
        """Load the model and open every resource (the workers' on_startup)."""
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
        health_url = f"http://{settings.advertise_host}:{port}/healthz"
        info = NodeInfo(
            node_id=self.node_id,
            model=profile.model,
            model_hash=profile.model_hash,
            pipeline=profile.pipeline,
            device=profile.device,
            memory_bytes=profile.memory_bytes,
            max_batch=settings.gpu_max_batch or engine.default_max_batch,
            default_steps=profile.default_steps,
            default_guidance=profile.default_guidance,
            default_scheduler=profile.default_scheduler,
            default_width=profile.default_width,
            default_height=profile.default_height,
            max_width=profile.max_width,
            max_height=profile.max_height,
            schedulers=list(profile.schedulers),
            health_url=health_url,
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
        self._wakeups = {
            queue: asyncio.Event()
            for queue in (premium_queue(profile.model), batch_queue(profile.model))
        }
        workers = [
            self._worker(
                redis,
                premium_queue(profile.model),
                GENERATE_FUNCTION,
                self.generate,
                premium=True,
            ),
            self._worker(
                redis,
                batch_queue(profile.model),
                BATCH_FUNCTION,
                self.generate_batch,
                premium=False,
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
        ]
        stack.push_async_callback(_cancel_tasks, background)
        return NodeResources(
            redis=redis,
            engine=engine,
            executor=executor,
            publisher=publisher,
            cancels=cancels,
            announcer=announcer,
            health_url=health_url,
            info=info,
            workers=workers,
        )

    def _worker(
        self,
        redis: ArqRedis,
        queue: str,
        name: str,
        coroutine: Callable[..., Awaitable[str]],
        *,
        premium: bool,
    ) -> Worker:
        settings = self.settings
        worker = Worker(
            functions=[
                func(
                    cast(Any, coroutine),
                    name=name,
                    timeout=ARQ_FUNCTION_TIMEOUT_S,
                    max_tries=settings.gpu_max_tries,
                )
            ],
            queue_name=queue,
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
            job_serializer=serialize,
            job_deserializer=deserialize,
            health_check_interval=60,
            health_check_key=f"{queue}:health-check:{self.node_id}",
            after_job_end=wake_after_job(self._wakeups[queue]),
            ctx={},
            log_results=False,
        )
        # arq claims a job for (function timeout + 10 s); a long claim would keep a
        # SIGKILLed node's job for hours. Claims last one lease instead, and the
        # running job keeps extending its own (see `_lease`).
        worker.in_progress_timeout_s = settings.gpu_job_lease_s
        return worker

    def request_stop(self) -> None:
        """Begin a graceful stop (signal handlers call this)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def serve(self) -> None:
        """Run both workers until `request_stop()`, then drain and return."""
        workers = self.resources.workers
        loops = [
            asyncio.create_task(
                self._supervise(worker), name=f"arq:{worker.queue_name}"
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

    async def _supervise(self, worker: Worker) -> None:
        # arq's poll loop dies on a Redis error; restart it (Redis restarts, the
        # node keeps serving) instead of letting the process crash.
        while True:
            try:
                await worker.main()
                return
            except (RedisError, OSError) as exc:
                log.warning(
                    "queue %s: Redis unavailable (%s); retrying", worker.queue_name, exc
                )
                await _release_lost_slots(worker)
                await asyncio.sleep(1.0)
            except Exception:
                # Anything else is a bug: stop the node (exit 1) rather than
                # keep announcing a node that no longer serves this queue.
                log.exception("queue %s: worker crashed", worker.queue_name)
                self.failed = True
                self.request_stop()
                return

    async def _drain(
        self, workers: list[Worker], loops: list[asyncio.Task[None]]
    ) -> None:
        self._draining = True
        running = [t for w in workers for t in w.tasks.values() if not t.done()]
        log.info("draining: %d job(s) running, no new jobs taken", len(running))
        for worker in workers:
            worker.allow_pick_jobs = False
        # Let a poll iteration that is claiming a job finish claiming it.
        await asyncio.sleep(max(w.poll_delay_s for w in workers) + 0.05)
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await self.resources.announcer.withdraw()
        running = [t for w in workers for t in w.tasks.values() if not t.done()]
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
        """Release every resource (the workers' on_shutdown)."""
        closing, self._closing = self._closing, None
        self._resources = None
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

    # --- arq jobs ----------------------------------------------------------

    def _time_limit(self, params: GenerationParams, images: int) -> float:
        """How long a job of this size may take here, in seconds."""
        return job_timeout_s(
            params,
            images,
            base_s=self.settings.gpu_timeout_base_s,
            seconds_per_image_step=self.settings.gpu_timeout_per_image_step_s,
        )

    async def generate(self, ctx: dict[str, Any], payload: Any) -> str:
        """arq `generate`: one premium generation."""
        try:
            job = GenerationJob.model_validate(payload)
        except ValidationError as exc:
            await self._refuse(payload, exc)
            raise InvalidPayload(f"bad {GENERATE_FUNCTION} payload: {exc}") from None
        timeout = self._time_limit(job.params, job.params.num_images)
        return await self._run_job(ctx, [job], Tier.PREMIUM, timeout)

    async def generate_batch(self, ctx: dict[str, Any], payload: Any) -> str:
        """arq `generate_batch`: compatible normal-tier generations, one call."""
        try:
            batch = BatchJob.model_validate(payload)
        except ValidationError as exc:
            await self._refuse(payload, exc)
            raise InvalidPayload(f"bad {BATCH_FUNCTION} payload: {exc}") from None
        timeout = self._time_limit(batch.items[0].params, batch.image_count)
        return await self._run_job(ctx, list(batch.items), Tier.NORMAL, timeout)

    async def _refuse(self, payload: Any, error: ValidationError) -> None:
        """Fail every generation a malformed payload names, saying why.

        The job itself fails for good; without a result, its rows would wait
        for the reconciler and then fail with no reason given.
        """
        named = _named_generations(payload)
        if not named:
            return
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "payload"
        reason = ErrorInfo(
            code="invalid_request",
            message=f"the GPU node refused the job: {where}: {problem['msg']}",
        )
        profile = self.resources.engine.profile
        try:
            for generation_id, attempt in named:
                result = GenerationResult(
                    generation_id=generation_id,
                    attempt=attempt,
                    status=Status.FAILED,
                    error=reason,
                    node_id=self.node_id,
                    model=profile.model,
                    model_hash=profile.model_hash,
                    finished_at=_now(),
                )
                await enqueue(
                    self.resources.redis,
                    STORE_RESULT_FUNCTION,
                    result,
                    queue=RESULTS_QUEUE,
                    job_id=result_job_id(generation_id, attempt),
                )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("Redis failed refusing a bad payload: %s; retrying", exc)
            raise Retry(defer=5) from exc

    async def _run_job(
        self,
        ctx: dict[str, Any],
        jobs: list[GenerationJob],
        tier: Tier,
        timeout_s: float,
    ) -> str:
        enqueued = ctx.get("enqueue_time")
        if isinstance(enqueued, datetime):
            wait = (_now() - enqueued).total_seconds()
            self.metrics.queue_wait.labels(tier.value).observe(max(wait, 0.0))
        job_id = str(ctx.get("job_id", ""))
        try:
            async with self._lease(job_id) as lost:
                statuses = await self._generate(jobs, tier, timeout_s, lost)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # Redis stayed away longer than the client's own retries: run the job
            # again later (the images come out the same).
            log.warning("Redis failed during a %s job: %s; retrying", tier.value, exc)
            raise Retry(defer=5) from exc
        except LeaseLost:
            log.warning(
                "job %s stopped undelivered: its new holder delivers it", job_id
            )
            return "lease lost"
        return ",".join(statuses)

    @contextlib.asynccontextmanager
    async def _lease(self, job_id: str) -> AsyncIterator[threading.Event]:
        """Keep arq's claim on the running job; the event is set if it was lost."""
        lease_ms = int(self.settings.gpu_job_lease_s * 1000)
        redis = self.resources.redis
        lost = threading.Event()

        async def refresh() -> None:
            while True:
                try:
                    held = await _extend_claim(redis, job_id, lease_ms)
                except (RedisError, OSError) as exc:
                    log.warning("cannot extend the claim on job %s: %s", job_id, exc)
                else:
                    if not held:
                        log.error(
                            "job %s: lost the claim on it to another node; "
                            "stopping at the next step",
                            job_id,
                        )
                        lost.set()
                        return
                await asyncio.sleep(lease_ms / 4000)

        task = asyncio.create_task(refresh(), name=f"lease:{job_id}")
        try:
            yield lost
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _prepare(self, job: GenerationJob) -> _Prepared:
        engine = self.resources.engine
        profile = engine.profile
        params = job.params
        item = _Prepared(
            job, _normalize(params.prompt), _normalize(params.negative_prompt)
        )
        if job.model != profile.model:
            item.fail(
                "invalid_request", f"this node serves {profile.model}, not {job.model}"
            )
        elif params.width > profile.max_width or params.height > profile.max_height:
            item.fail(
                "invalid_request",
                f"size {params.width}x{params.height} is over the model's limit "
                f"{profile.max_width}x{profile.max_height}",
            )
        elif params.scheduler not in profile.schedulers:
            item.fail(
                "invalid_request",
                f"unknown scheduler {params.scheduler!r}; one of "
                + ", ".join(profile.schedulers),
            )
        elif not item.prompt:
            item.fail("invalid_request", "the prompt is empty")
        else:
            window = profile.token_window
            prompt_tokens, negative_tokens = await asyncio.to_thread(
                lambda: (
                    engine.count_tokens(item.prompt),
                    engine.count_tokens(item.negative_prompt),
                )
            )
            item.prompt_dropped = max(0, prompt_tokens - window)
            item.negative_dropped = max(0, negative_tokens - window)
        return item

    async def _generate(
        self,
        jobs: list[GenerationJob],
        tier: Tier,
        timeout_s: float,
        lost: threading.Event,
    ) -> list[str]:
        resources = self.resources
        redis = resources.redis
        deadline = _Deadline(asyncio.get_running_loop().time() + timeout_s)
        items: list[_Prepared] = []
        for job in jobs:
            if await _delivered(redis, result_job_id(job.generation_id, job.attempt)):
                log.info(
                    "generation %s attempt %d already delivered",
                    job.generation_id,
                    job.attempt,
                )
                continue
            items.append(await self._prepare(job))
        keys = [item.key for item in items]
        cancelled = await resources.cancels.watch(keys)
        try:
            for item in items:
                if item.key in cancelled and item.status is None:
                    item.status = Status.CANCELLED
            todo = [item for item in items if item.status is None]
            for item in todo:
                self._announce_started(item)
            # Telling `jobs` is not on the way to the GPU: it runs beside the call.
            notices = [asyncio.create_task(self._mark_started(item)) for item in todo]
            try:
                if todo:
                    await self._run_calls(todo, tier, deadline, lost)
            finally:
                outcomes = await asyncio.gather(*notices, return_exceptions=True)
                for item, outcome in zip(todo, outcomes, strict=True):
                    if isinstance(outcome, BaseException):
                        # The result still goes out: `jobs` records the start
                        # with it, and losing finished GPU work over a notice
                        # would be the worse failure.
                        log.warning(
                            "cannot tell jobs that %s started: %r", item.key, outcome
                        )
            await self._deliver(items, tier)
        finally:
            resources.cancels.unwatch(keys)
        return [str(item.status) for item in items]

    def _announce_started(self, item: _Prepared) -> None:
        """Queue the `started` event before any of the call's progress."""
        resources = self.resources
        item.started_at = _now()
        resources.publisher.emit(item.key, StartedEvent(node_id=self.node_id))
        resources.publisher.set_progress(item.key, 0, item.job.params.steps)

    async def _mark_started(self, item: _Prepared) -> None:
        """Have `jobs` record the start (queued -> running) in the database."""
        if item.started_at is None:
            raise RuntimeError("announce the start first")
        notice = StartedNotice(
            generation_id=item.job.generation_id,
            attempt=item.job.attempt,
            node_id=self.node_id,
            started_at=item.started_at,
        )
        await enqueue(
            self.resources.redis,
            MARK_STARTED_FUNCTION,
            notice,
            queue=RESULTS_QUEUE,
            job_id=started_job_id(item.job.generation_id, item.job.attempt),
        )

    async def _run_calls(
        self,
        todo: list[_Prepared],
        tier: Tier,
        deadline: _Deadline,
        lost: threading.Event,
    ) -> None:
        params = todo[0].job.params
        by_key = {item.key: item for item in todo}
        call = PipelineCall(
            width=params.width,
            height=params.height,
            steps=params.steps,
            guidance_scale=params.guidance_scale,
            scheduler=params.scheduler,
            items=tuple(
                CallItem(
                    item.key,
                    item.prompt,
                    item.negative_prompt,
                    tuple(item.job.params.image_seeds()),
                )
                for item in todo
            ),
        )
        calls = call.split(self.info.max_batch)
        progress = {
            item.key: ItemProgress(item.job.params.steps, _calls_with(calls, item.key))
            for item in todo
        }
        while calls:
            if lost.is_set():
                raise LeaseLost
            current = calls.pop(0)
            live = [
                key
                for key in dict.fromkeys(i.key for i in current.items)
                if by_key[key].status is None
            ]
            if not live:
                continue
            current = current.only(live)
            try:
                grouped, cancelled = await self._run_call(
                    current, tier, deadline, {k: progress[k] for k in live}, lost
                )
            except OutOfMemory as exc:
                if current.image_count > 1:
                    log.warning("out of memory (%s): splitting the call in two", exc)
                    pieces = current.split((current.image_count + 1) // 2)
                    for key in live:
                        progress[key].resplit(_calls_with(pieces, key))
                    calls[:0] = pieces
                    continue
                for key in live:
                    by_key[key].fail(
                        "out_of_memory", "the image does not fit in GPU memory"
                    )
                continue
            except TimeoutError:
                for key in live:
                    by_key[key].fail(
                        "timeout", "the generation took longer than its time limit"
                    )
                continue
            except (RedisError, LeaseLost):
                raise
            except Exception:
                log.exception("pipeline call failed")
                for key in live:
                    by_key[key].fail(
                        "internal_error", "the GPU node failed to run the model"
                    )
                continue
            for key in live:
                progress[key].call_done()
            for key in cancelled:
                by_key[key].status = Status.CANCELLED
            for key, images in grouped.items():
                if by_key[key].status is None:
                    by_key[key].images.extend(images)
        for item in todo:
            if item.status is None:
                item.status = Status.SUCCEEDED

    async def _run_call(
        self,
        call: PipelineCall,
        tier: Tier,
        deadline: _Deadline,
        progress: dict[str, ItemProgress],
        lost: threading.Event,
    ) -> tuple[dict[str, list[Image]], set[str]]:
        resources = self.resources
        premium = tier is Tier.PREMIUM
        metrics = self.metrics
        observer = CallObserver(
            progress,
            resources.publisher,
            resources.cancels,
            preview_every=self.settings.gpu_preview_every,
            min_interval_s=self.settings.gpu_progress_interval_s,
            # Only batches yield: premium calls never nest inside each other.
            executor=None if premium else resources.executor,
            on_step_done=lambda _step: metrics.steps.inc(),
            stop=lost,
        )
        engine = resources.engine

        def run() -> dict[str, list[Image]]:
            started = time.perf_counter()
            images = engine.run(call, observer)
            seconds = max(time.perf_counter() - started - observer.yielded_s, 1e-9)
            metrics.call_seconds.labels(tier.value).observe(seconds)
            metrics.steps_per_second.set(observer.steps_done / seconds)
            metrics.images_per_second.set(call.image_count / seconds)
            return images

        future = resources.executor.submit(run, premium=premium)
        try:
            # Time spent running premium calls nested in this one is not its own.
            images = await _await_thread(
                future,
                lambda: deadline.at + observer.yielded_s,
                observer.abort.set,
            )
        except CallStopped:
            if lost.is_set():
                raise LeaseLost from None
            return {}, set(observer.keys)
        finally:
            deadline.at += observer.yielded_s
        return images, set(observer.cancelled)

    async def _deliver(self, items: list[_Prepared], tier: Tier) -> None:
        resources = self.resources
        profile = resources.engine.profile
        succeeded = [item for item in items if item.status is Status.SUCCEEDED]
        stored = await asyncio.gather(*(self._store_images(i) for i in succeeded))
        infos = {
            item.key: images for item, images in zip(succeeded, stored, strict=True)
        }
        results: list[GenerationResult] = []
        for item in items:
            results.append(
                GenerationResult(
                    generation_id=item.job.generation_id,
                    attempt=item.job.attempt,
                    status=item.status or Status.FAILED,
                    images=infos.get(item.key, []),
                    error=item.error,
                    node_id=self.node_id,
                    model=profile.model,
                    model_hash=profile.model_hash,
                    started_at=item.started_at,
                    finished_at=_now(),
                    prompt_tokens_dropped=item.prompt_dropped,
                    negative_prompt_tokens_dropped=item.negative_dropped,
                )
            )
        # Everything this node says about these generations is in their streams
        # before `jobs` can append `done`.
        await resources.publisher.flush()
        for result in results:
            await enqueue(
                resources.redis,
                STORE_RESULT_FUNCTION,
                result,
                queue=RESULTS_QUEUE,
                job_id=result_job_id(result.generation_id, result.attempt),
            )
            self.metrics.generations.labels(tier.value, result.status.value).inc()
            self.metrics.images.labels(tier.value).inc(len(result.images))

    async def _store_images(self, item: _Prepared) -> list[ImageInfo]:
        resources = self.resources
        profile = resources.engine.profile
        params = item.job.params
        seeds = params.image_seeds()
        manifests = [
            ImageManifest(
                generation_id=item.key,
                index=index,
                model=profile.model,
                model_hash=profile.model_hash,
                scheduler=params.scheduler,
                seed=seed,
                steps=params.steps,
                guidance_scale=params.guidance_scale,
                width=params.width,
                height=params.height,
                prompt=item.prompt,
                negative_prompt=item.negative_prompt,
                versions=profile.versions,
            )
            for index, seed in enumerate(seeds)
        ]
        # Encoding and hashing are CPU work: in threads, the images in parallel
        # (zlib and hashlib let go of the GIL).
        encoded = await asyncio.gather(
            *(
                asyncio.to_thread(_encode, image, manifest)
                for image, manifest in zip(item.images, manifests, strict=True)
            )
        )
        infos: list[ImageInfo] = []
        for index, (seed, image, (png, digest)) in enumerate(
            zip(seeds, item.images, encoded, strict=True)
        ):
            kept = await _keep_first_png(
                resources.redis, image_key(item.key, index), png
            )
            if kept is not png:
                digest = await asyncio.to_thread(sha256_hex, kept)
            resources.publisher.emit(
                item.key,
                ImageEvent(
                    index=index,
                    seed=seed,
                    width=image.width,
                    height=image.height,
                    sha256=digest,
                ),
            )
            infos.append(
                ImageInfo(
                    index=index,
                    seed=seed,
                    width=image.width,
                    height=image.height,
                    sha256=digest,
                    size_bytes=len(kept),
                )
            )
        return infos


class LeaseLost(Exception):
    """Another node claimed the running job: stop, and let that node deliver."""


@dataclass
class _Deadline:
    """When a job must end (loop time), pushed back by nested premium work."""

    at: float


def _calls_with(calls: list[PipelineCall], key: str) -> int:
    return sum(any(item.key == key for item in call.items) for call in calls)


def _encode(image: Image, manifest: ImageManifest) -> tuple[bytes, str]:
    png = encode_png(image, manifest)
    return png, sha256_hex(png)


async def _keep_first_png(redis: ArqRedis, key: str, png: bytes) -> bytes:
    """Store `png` at `key` unless it holds one already; the bytes that stay.

    A generation may run twice (a lost lease, a re-enqueue by the reconciler)
    and a GPU need not draw the same bytes twice. The first PNG stays and
    every result of the generation describes it, so `jobs` never finds an
    image that does not match its hash.
    """
    while True:
        if await redis.set(key, png, nx=True, ex=IMAGE_TTL_S):
            return png
        kept: bytes | None = await redis.getex(key, ex=IMAGE_TTL_S)
        if kept is not None:
            return kept


async def _extend_claim(redis: ArqRedis, job_id: str, lease_ms: int) -> bool:
    """Extend this node's claim on a job; False if another node holds it now.

    arq marks a claim with the same value whoever holds it, so a claim taken
    over after ours expired cannot be told apart; what can be seen is our key
    gone, and then whether we win it back before another node takes it.
    """
    key = in_progress_key_prefix + job_id
    if await redis.pexpire(key, lease_ms):
        return True
    log.warning("the claim on job %s had expired; taking it back", job_id)
    return bool(await redis.set(key, b"1", nx=True, px=lease_ms))


async def _cancel_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _named_generations(payload: Any) -> list[tuple[UUID, int]]:
    """(id, attempt) of each generation a payload names, however bad the rest."""
    if not isinstance(payload, dict):
        return []
    entries = payload.get("items", [payload])
    named: list[tuple[UUID, int]] = []
    for entry in entries if isinstance(entries, list) else []:
        try:
            found = _Named.model_validate(entry)
        except ValidationError:
            continue
        named.append((found.generation_id, found.attempt))
    return named


class _Named(BaseModel):
    model_config = ConfigDict(extra="ignore")

    generation_id: UUID
    attempt: int = Field(default=1, ge=1)


async def _await_thread(
    future: Future[T], deadline: Callable[[], float], abort: Callable[[], None]
) -> T:
    """Await work on the GPU thread until `deadline()` (loop time, may move).

    On cancel or timeout, stop it and wait for it: the thread cannot be
    killed, it is told to stop at its next step boundary, and nothing else
    touches the GPU until it has.
    """
    loop = asyncio.get_running_loop()
    wrapped = asyncio.wrap_future(future)
    try:
        while not wrapped.done():
            remaining = deadline() - loop.time()
            if remaining <= 0:
                raise TimeoutError
            # `wait` neither cancels `wrapped` nor raises its exception.
            await asyncio.wait({wrapped}, timeout=remaining)
        return wrapped.result()
    except (asyncio.CancelledError, TimeoutError):
        abort()
        future.cancel()  # still queued: it never starts
        with contextlib.suppress(BaseException):
            await wrapped
        raise


async def _delivered(redis: ArqRedis, job_id: str) -> bool:
    # The `store_result` job of this attempt is queued or done: the work was
    # finished by an earlier run of this job (arq runs jobs at least once).
    count: int = await redis.exists(job_key_prefix + job_id, result_key_prefix + job_id)
    return count > 0


async def _release_lost_slots(worker: Worker) -> None:
    # arq 0.28 takes a job slot before claiming a job in Redis and gives it back
    # only when the job's task ends; a Redis error in between leaks the slot,
    # and with max_jobs=1 the worker would never take a job again.
    running = sum(not task.done() for task in worker.tasks.values())
    if worker.job_counter == running:
        return
    worker.job_counter = running
    worker.sem = asyncio.BoundedSemaphore(worker.max_jobs + 1)
    for _ in range(running):
        await worker.sem.acquire()


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

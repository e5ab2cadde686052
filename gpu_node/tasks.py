"""The node's two queue tasks: `generate` (premium) and `generate_batch`.

Each validates its payload, holds its lease while it runs, skips work an
earlier run already delivered, runs the rest (`gpu_node.runner`) and hands
the outcome to `jobs` (`gpu_node.delivery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from uuid import uuid4

from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpu_node.calls import Engine, LoraUse
from gpu_node.delivery import deliver, refuse
from gpu_node.images import InputError, load_input
from gpu_node.items import PreparedItem
from gpu_node.resources import NodeResources
from gpu_node.runner import Deadline, LeaseLost, run_calls
from gpu_node.speed import job_calls
from sdapi.contract.events import LoadingModelEvent, StartedEvent
from sdapi.contract.names import (
    BATCH_FUNCTION,
    GENERATE_FUNCTION,
    MARK_STARTED_FUNCTION,
    RESULTS_QUEUE,
    input_key,
    result_job_id,
    started_job_id,
)
from sdapi.contract.payloads import (
    BatchJob,
    GenerationJob,
    GenerationParams,
    StartedNotice,
    job_timeout_s,
)
from sdapi.contract.status import Status, Tier
from sdapi.infra.clock import utcnow
from sdapi.infra.eta import Work
from sdapi.infra.queue import (
    Lease,
    Retry,
    enqueue,
    job_info,
    job_or_result_exists,
)

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

# After Redis stayed away longer than its client's own retries (seconds).
REDIS_RETRY_S = 5


class InvalidPayload(ValueError):
    """A job payload failed validation: the job fails for good, no retry."""


def _normalize(text: str) -> str:
    return " ".join(text.split())


class NodeTasks:
    """The queue tasks of one running node."""

    def __init__(self, resources: NodeResources) -> None:
        self.resources = resources

    def time_limit(self, params: GenerationParams, images: int) -> float:
        """How long a job of this size may take here, in seconds."""
        settings = self.resources.settings
        return job_timeout_s(
            params,
            images,
            base_s=settings.gpu_timeout_base_s,
            seconds_per_image_step=settings.gpu_timeout_per_image_step_s,
        )

    async def generate(self, ctx: dict[str, Any], payload: Any) -> str:
        """`generate`: one premium generation."""
        try:
            job = GenerationJob.model_validate(payload)
        except ValidationError as exc:
            await self._refuse(payload, exc)
            raise InvalidPayload(f"bad {GENERATE_FUNCTION} payload: {exc}") from None
        timeout = self.time_limit(job.params, job.params.num_images)
        return await self._run_job(ctx, [job], Tier.PREMIUM, timeout)

    async def generate_batch(self, ctx: dict[str, Any], payload: Any) -> str:
        """`generate_batch`: compatible normal-tier generations, one call."""
        try:
            batch = BatchJob.model_validate(payload)
        except ValidationError as exc:
            await self._refuse(payload, exc)
            raise InvalidPayload(f"bad {BATCH_FUNCTION} payload: {exc}") from None
        timeout = self.time_limit(batch.items[0].params, batch.image_count)
        return await self._run_job(ctx, list(batch.items), Tier.NORMAL, timeout)

    async def _refuse(self, payload: Any, error: ValidationError) -> None:
        try:
            await refuse(self.resources, payload, error)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("Redis failed refusing a bad payload: %s; retrying", exc)
            raise Retry(defer=REDIS_RETRY_S) from exc

    async def _run_job(
        self,
        ctx: dict[str, Any],
        jobs: list[GenerationJob],
        tier: Tier,
        timeout_s: float,
    ) -> str:
        info = job_info(ctx)
        claimed = time.perf_counter()
        if info.enqueued_at is not None:
            wait = (utcnow() - info.enqueued_at).total_seconds()
            self.resources.metrics.queue_wait.labels(tier.value).observe(max(wait, 0.0))
        try:
            async with self._lease(info.job_id) as lost:
                statuses = await self._generate_with_model(
                    jobs, tier, timeout_s, lost, claimed
                )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            # Redis stayed away longer than the client's own retries: run the job
            # again later (the images come out the same).
            log.warning("Redis failed during a %s job: %s; retrying", tier.value, exc)
            raise Retry(defer=REDIS_RETRY_S) from exc
        except LeaseLost:
            log.warning(
                "job %s stopped undelivered: its new holder delivers it", info.job_id
            )
            return "lease lost"
        return ",".join(statuses)

    @contextlib.asynccontextmanager
    async def _lease(self, job_id: str) -> AsyncIterator[threading.Event]:
        """Hold the running job's lease; the event is set once it is lost."""
        resources = self.resources
        lease_ms = int(resources.settings.gpu_job_lease_s * 1000)
        # A token per run: a later run of the same job, here or elsewhere, is
        # another holder.
        holder = f"{resources.node_id}:{uuid4().hex[:12]}"
        lease = Lease(resources.redis, job_id, holder, lease_ms)
        lost = threading.Event()
        if not await lease.take():
            lost.set()

        async def renew() -> None:
            while not lost.is_set():
                await asyncio.sleep(lease_ms / 4000)
                try:
                    held = await lease.renew()
                except (RedisError, OSError) as exc:
                    log.warning("cannot renew the lease on job %s: %s", job_id, exc)
                    continue
                if not held:
                    log.error(
                        "job %s: another node took it over; stopping at the next step",
                        job_id,
                    )
                    lost.set()

        task = asyncio.create_task(renew(), name=f"lease:{job_id}")
        try:
            yield lost
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _generate_with_model(
        self,
        jobs: list[GenerationJob],
        tier: Tier,
        timeout_s: float,
        lost: threading.Event,
        claimed: float,
    ) -> list[str]:
        """Run `jobs` (one model) with their model loaded, loading it if need be;
        learn how long the job took outside its pipeline calls (`claimed`: its
        claim, `time.perf_counter()`)."""
        models = self.resources.models
        model = jobs[0].model
        if model not in models.slots:
            # Not served here (a job in a queue no node of this catalogue
            # should read): fails by `_prepare` with the primary model.
            model = models.primary
        publisher = self.resources.publisher

        def loading() -> None:
            for one in jobs:
                publisher.emit(str(one.generation_id), LoadingModelEvent(model=model))

        async with models.using(
            model, premium=tier is Tier.PREMIUM, on_load=loading
        ) as (engine, load_s):
            if load_s is not None:
                log.info("model %s loaded for a %s job in %.2f s", model, tier, load_s)
            calls = job_calls.set([])
            try:
                statuses = await self._generate(
                    engine, jobs, tier, timeout_s, lost, load_s
                )
                spent = job_calls.get() or []
            finally:
                job_calls.reset(calls)
        # Only a job whose calls all ran to their end says what a job costs.
        if spent and all(status == Status.SUCCEEDED for status in statuses):
            params = jobs[0].params
            self.resources.speeds.observe_job(
                model,
                width=params.width,
                height=params.height,
                seconds=time.perf_counter() - claimed - sum(spent) - (load_s or 0.0),
            )
        # After the hand-over: an estimate is never worth delaying images for.
        await self.resources.speeds.publish(self.resources.redis)
        return statuses

    async def _prepare(self, engine: Engine, job: GenerationJob) -> PreparedItem:
        profile = engine.profile
        limits = profile.limits
        params = job.params
        item = PreparedItem(
            job, _normalize(params.prompt), _normalize(params.negative_prompt)
        )
        if job.model != profile.model:
            item.fail(
                "invalid_request", f"this node serves {profile.model}, not {job.model}"
            )
        elif params.width > limits.max_width or params.height > limits.max_height:
            item.fail(
                "invalid_request",
                f"size {params.width}x{params.height} is over the model's limit "
                f"{limits.max_width}x{limits.max_height}",
            )
        elif params.scheduler not in limits.schedulers:
            item.fail(
                "invalid_request",
                f"unknown scheduler {params.scheduler!r}; one of "
                + ", ".join(limits.schedulers),
            )
        elif not item.prompt:
            item.fail("invalid_request", "the prompt is empty")
        elif not self._find_loras(engine, item):
            pass
        elif not await self._fetch_inputs(item):
            pass
        else:
            syntax = params.prompt_syntax
            item.windows = await asyncio.to_thread(
                lambda: max(
                    engine.prompt_windows(item.prompt, syntax),
                    engine.prompt_windows(item.negative_prompt, syntax),
                )
            )
        return item

    def _find_loras(self, engine: Engine, item: PreparedItem) -> bool:
        """Resolve the item's LoRAs to files here; False if one is missing."""
        kind = engine.profile.lora_kind
        found: list[LoraUse] = []
        for lora in item.job.params.loras:
            file = self.resources.loras.get(lora.name)
            if file is None:
                item.fail("invalid_request", f"LoRA {lora.name!r} is not on this node")
                return False
            if kind and file.kind != kind:
                item.fail(
                    "invalid_request",
                    f"LoRA {lora.name!r} is for {file.kind} models, not {kind}",
                )
                return False
            found.append(LoraUse(lora.name, lora.weight, file.path, file.sha256))
        item.loras = tuple(found)
        return True

    async def _fetch_inputs(self, item: PreparedItem) -> bool:
        """Load the item's input images from Redis by hash; False if it failed."""
        params = item.job.params
        found: list[Image] = []
        for digest, mode in (
            (params.init_image_sha256, "RGB"),
            (params.mask_sha256, "L"),
        ):
            if digest is None:
                continue
            data: bytes | None = await self.resources.redis.get(input_key(digest))
            if data is None:
                item.fail(
                    "input_unavailable",
                    "an input image is no longer available; please submit again",
                )
                return False
            try:
                image = await asyncio.to_thread(
                    load_input, data, digest, mode, (params.width, params.height)
                )
            except InputError as exc:
                item.fail("invalid_request", str(exc))
                return False
            found.append(image)
        if found:
            item.init_image = found[0]
            item.mask = found[1] if len(found) > 1 else None
        return True

    async def _generate(
        self,
        engine: Engine,
        jobs: list[GenerationJob],
        tier: Tier,
        timeout_s: float,
        lost: threading.Event,
        load_s: float | None = None,
    ) -> list[str]:
        resources = self.resources
        deadline = Deadline(asyncio.get_running_loop().time() + timeout_s)
        items: list[PreparedItem] = []
        for job in jobs:
            # The `store_result` job of this attempt is queued or done: the
            # work was finished by an earlier run (arq runs jobs at least once).
            delivered = result_job_id(job.generation_id, job.attempt)
            if await job_or_result_exists(resources.redis, delivered):
                log.info(
                    "generation %s attempt %d already delivered",
                    job.generation_id,
                    job.attempt,
                )
                continue
            items.append(await self._prepare(engine, job))
        keys = [item.key for item in items]
        cancelled = await resources.cancels.watch(keys)
        try:
            for item in items:
                if item.key in cancelled and item.status is None:
                    item.status = Status.CANCELLED
            todo = [item for item in items if item.status is None]
            # The items of a job run in one call (or several, one after the
            # other): each ends when all of them have.
            run_s = self._run_s(engine, todo[0].job.params, todo) if todo else None
            for item in todo:
                self._announce_started(item, load_s, run_s)
            # Telling `jobs` is not on the way to the GPU: it runs beside the call.
            notices = [asyncio.create_task(self._mark_started(item)) for item in todo]
            try:
                if todo:
                    await run_calls(resources, engine, todo, tier, deadline, lost)
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
            await deliver(resources, engine.profile, items, tier)
        finally:
            resources.cancels.unwatch(keys)
        return [str(item.status) for item in items]

    def _run_s(
        self, engine: Engine, params: GenerationParams, todo: list[PreparedItem]
    ) -> float | None:
        """Seconds this node should take to run `todo`, from its own learned
        speed; None before it ran the model."""
        images = sum(item.job.params.num_images for item in todo)
        speeds = self.resources.speeds.speeds(engine.profile.model)
        return speeds.run_s(Work.of(params, images), self.resources.node_id)

    def _announce_started(
        self, item: PreparedItem, load_s: float | None, run_s: float | None
    ) -> None:
        """Queue the `started` event before any of the call's progress."""
        resources = self.resources
        item.started_at = utcnow()
        started = StartedEvent(
            node_id=resources.node_id,
            load_s=None if load_s is None else round(load_s, 3),
            eta_s=None if run_s is None else round(run_s, 1),
        )
        resources.publisher.emit(item.key, started)
        # img2img runs only strength * steps of them: the total users see.
        resources.publisher.set_progress(
            item.key, 0, item.job.params.denoising_steps, started=True
        )

    async def _mark_started(self, item: PreparedItem) -> None:
        """Have `jobs` record the start (queued -> running) in the database."""
        if item.started_at is None:
            raise RuntimeError("announce the start first")
        notice = StartedNotice(
            generation_id=item.job.generation_id,
            attempt=item.job.attempt,
            node_id=self.resources.node_id,
            started_at=item.started_at,
        )
        await enqueue(
            self.resources.redis,
            MARK_STARTED_FUNCTION,
            notice,
            queue=RESULTS_QUEUE,
            job_id=started_job_id(item.job.generation_id, item.job.attempt),
        )

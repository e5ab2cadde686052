"""Running a job's generations on the GPU thread: calls, deadlines, OOM splits.

A job's generations become pipeline calls of at most `max_batch` images. A
call that runs out of device memory is split in two and the halves run in
its place; a single image that does not fit fails as `out_of_memory`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from redis.exceptions import RedisError

from gpu_node.calls import (
    CallItem,
    CallStopped,
    Engine,
    LoraError,
    OutOfMemory,
    PipelineCall,
)
from gpu_node.items import PreparedItem
from gpu_node.progress import CallObserver, ItemProgress
from gpu_node.resources import NodeResources
from gpu_node.speed import job_calls
from sdapi.contract.status import Status, Tier

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

T = TypeVar("T")


class LeaseLost(Exception):
    """Another node claimed the running job: stop, and let that node deliver."""


@dataclass
class Deadline:
    """When a job must end (loop time), pushed back by nested premium work."""

    at: float


async def run_calls(
    resources: NodeResources,
    engine: Engine,
    todo: list[PreparedItem],
    tier: Tier,
    deadline: Deadline,
    lost: threading.Event,
) -> None:
    """Run `todo` (compatible generations) and set each one's outcome."""
    params = todo[0].job.params
    by_key = {item.key: item for item in todo}
    # Items whose prompts take as many encoder windows as each other share a
    # call: each image's embeddings are then what it gets alone.
    by_windows: dict[int, list[PreparedItem]] = {}
    for item in todo:
        by_windows.setdefault(item.windows, []).append(item)
    calls = [
        piece
        for group in by_windows.values()
        for piece in PipelineCall(
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
                    init_image=item.init_image,
                    mask=item.mask,
                )
                for item in group
            ),
            mode=params.mode,
            strength=params.effective_strength,
            prompt_syntax=params.prompt_syntax,
            loras=todo[0].loras,
        ).split(resources.settings.gpu_max_batch or engine.profile.limits.max_batch)
    ]
    progress = {
        item.key: ItemProgress(
            item.job.params.denoising_steps, _calls_with(calls, item.key)
        )
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
            grouped, cancelled = await _run_call(
                resources,
                engine,
                current,
                tier,
                deadline,
                {k: progress[k] for k in live},
                lost,
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
        except LoraError as exc:
            for key in live:
                by_key[key].fail("invalid_request", str(exc))
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
    resources: NodeResources,
    engine: Engine,
    call: PipelineCall,
    tier: Tier,
    deadline: Deadline,
    progress: dict[str, ItemProgress],
    lost: threading.Event,
) -> tuple[dict[str, list[Image]], set[str]]:
    premium = tier is Tier.PREMIUM
    metrics = resources.metrics
    observer = CallObserver(
        progress,
        resources.publisher,
        resources.cancels,
        preview_every=resources.settings.gpu_preview_every,
        min_interval_s=resources.settings.gpu_progress_interval_s,
        # Only batches yield: premium calls never nest inside each other.
        executor=None if premium else resources.executor,
        on_step_done=lambda _step: metrics.steps.inc(),
        stop=lost,
    )

    measured: list[float] = []

    def run() -> dict[str, list[Image]]:
        started = time.perf_counter()
        images = engine.run(call, observer)
        seconds = max(time.perf_counter() - started - observer.yielded_s, 1e-9)
        metrics.call_seconds.labels(tier.value).observe(seconds)
        metrics.steps_per_second.set(observer.steps_done / seconds)
        metrics.images_per_second.set(call.image_count / seconds)
        measured.append(seconds)
        return images

    future = resources.executor.submit(run, premium=premium)
    try:
        # Time spent running premium calls nested in this one is not its own.
        images = await await_thread(
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
        # Premium work nested in this call is not the job's own time either.
        spent = job_calls.get()
        if spent is not None and observer.yielded_s:
            spent.append(observer.yielded_s)
    if measured and observer.steps_done > 0:
        _learn(resources, engine, call, observer, measured[0])
    return images, set(observer.cancelled)


def _learn(
    resources: NodeResources,
    engine: Engine,
    call: PipelineCall,
    observer: CallObserver,
    seconds: float,
) -> None:
    """Learn the node's speed from a call that ran to its end (published once
    the job has handed its images over: `NodeTasks._generate_with_model`)."""
    steps = observer.steps_done
    step_s = observer.step_s
    resources.speeds.observe_call(
        engine.profile.model,
        width=call.width,
        height=call.height,
        images=call.image_count,
        steps=steps,
        seconds=seconds,
        step_seconds=seconds / steps if step_s is None else step_s,
    )


def _calls_with(calls: list[PipelineCall], key: str) -> int:
    return sum(any(item.key == key for item in call.items) for call in calls)


async def await_thread(
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

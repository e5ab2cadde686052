"""The jobs worker: an arq worker on the results queue plus periodic tasks.

Resources (database, Redis, node registry) are opened once in `on_startup`
and closed in `on_shutdown`, kept on arq's `ctx` as one typed object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable
from typing import Any

from jobs.resources import RESOURCES, JobsResources
from jobs.settings import JobsSettings
from sdapi.contract.names import (
    IMAGE_TTL_S,
    MARK_STARTED_FUNCTION,
    RESULTS_QUEUE,
    STORE_RESULT_FUNCTION,
)
from sdapi.db.connection import open_database
from sdapi.db.image_store import ImageStores
from sdapi.infra.consul import open_consul
from sdapi.infra.queue import QueuePool, QueueWorker, Task, new_worker, redis_settings
from sdapi.infra.registry import CONSUL_WAIT_S, NodeRegistry

log = logging.getLogger(__name__)

# A periodic task; what it returns (a count, a report) is ignored.
Periodic = Callable[[JobsResources], Awaitable[object]]


async def _every(
    name: str, interval: float, task: Periodic, resources: JobsResources
) -> None:
    """Run `task` every `interval` seconds, or sooner when woken
    (`JobsResources.wake`), until the worker stops; log failures."""
    woken = resources.wakeup(name)
    while not resources.stopping.is_set():
        woken.clear()  # a wake-up while the task runs runs it again
        try:
            await task(resources)
        except Exception:
            log.exception("periodic task %s failed; retrying in %.1fs", name, interval)
        waits = [
            asyncio.ensure_future(resources.stopping.wait()),
            asyncio.ensure_future(woken.wait()),
        ]
        await asyncio.wait(waits, timeout=interval, return_when=FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()


def periodic_tasks(settings: JobsSettings) -> list[tuple[str, float, Periodic]]:
    """The periodic tasks of the worker, with their intervals in seconds."""
    from jobs.cleanup import clean_up
    from jobs.dispatcher import dispatch_due
    from jobs.email_sender import send_due_emails
    from jobs.reconciler import reconcile
    from jobs.storage_deleter import delete_due_objects
    from jobs.webhook_sender import WEBHOOKS_TASK, send_due_webhooks

    return [
        ("outbox", settings.outbox_interval, send_due_emails),
        ("dispatch", settings.dispatch_interval, dispatch_due),
        ("reconcile", settings.reconcile_interval, reconcile),
        ("cleanup", settings.cleanup_interval, clean_up),
        (WEBHOOKS_TASK, settings.webhook_interval, send_due_webhooks),
        ("storage-deletions", settings.storage_deletion_interval, delete_due_objects),
    ]


async def on_startup(ctx: dict[str, Any]) -> None:
    """Open the database and registry; start the periodic tasks."""
    settings: JobsSettings = ctx["settings"]
    stack = contextlib.AsyncExitStack()
    redis: QueuePool = ctx["redis"]
    try:
        await stack.enter_async_context(open_database(settings.database_url or ""))
        consul = watch = None
        if settings.consul_url:
            consul = await stack.enter_async_context(open_consul(settings.consul_url))
            # A blocking query holds its call open for up to `wait` (+1/16).
            watch = await stack.enter_async_context(
                open_consul(settings.consul_url, timeout_s=CONSUL_WAIT_S * 1.25 + 5)
            )
        registry = NodeRegistry(redis, consul)
        await stack.enter_async_context(registry.watching(watch))
        stores = ImageStores(settings.storage_url, timeout_s=settings.storage_timeout)
        stack.push_async_callback(stores.close)
    except BaseException:
        await stack.aclose()
        raise
    resources = JobsResources(
        settings=settings, redis=redis, registry=registry, stack=stack, stores=stores
    )
    ctx[RESOURCES] = resources
    for name, interval, task in periodic_tasks(settings):
        resources.loops.append(
            asyncio.create_task(
                _every(name, interval, task, resources), name=f"sdapi-{name}"
            )
        )
    log.info("jobs worker started (queue %s)", RESULTS_QUEUE)


async def on_shutdown(ctx: dict[str, Any]) -> None:
    """Let the periodic tasks finish their round, then close everything."""
    resources = ctx.get(RESOURCES)
    if resources is None:
        return
    resources.stopping.set()
    await asyncio.gather(*resources.loops, return_exceptions=True)
    await resources.stack.aclose()


def job_functions() -> list[Task]:
    """The tasks of the results queue."""
    from jobs.results import (
        MARK_STARTED_MAX_TRIES,
        STORE_RESULT_MAX_TRIES,
        mark_started,
        store_result,
    )

    return [
        Task(STORE_RESULT_FUNCTION, store_result, STORE_RESULT_MAX_TRIES),
        Task(MARK_STARTED_FUNCTION, mark_started, MARK_STARTED_MAX_TRIES),
    ]


def build_worker(
    settings: JobsSettings, *, handle_signals: bool = True, job_completion_wait: int = 0
) -> QueueWorker:
    """The jobs worker for resolved `settings` (`new_worker` explains the rest)."""
    return new_worker(
        job_functions(),
        queue=RESULTS_QUEUE,
        redis_settings=redis_settings(settings.redis_url or ""),
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        ctx={"settings": settings},
        # `sdapi jobs` is woken by each enqueue (jobs.main); polling is the
        # fallback for a wake-up lost while Redis restarted.
        poll_delay=0.2,
        max_jobs=20,
        job_timeout=120,
        # A result key keeps the payload a node sent: as long as the images
        # it names live, the reconciler can store a result whose job failed.
        keep_result=IMAGE_TTL_S,
        handle_signals=handle_signals,
        job_completion_wait=job_completion_wait,
    )

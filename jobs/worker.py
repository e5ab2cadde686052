"""The jobs worker: an arq worker on the results queue plus periodic tasks.

Resources (database, Redis, node registry) are opened once in `on_startup`
and closed in `on_shutdown`, kept on arq's `ctx` as one typed object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Worker, func

from gpu_node.schemas import (
    IMAGE_TTL_S,
    MARK_STARTED_FUNCTION,
    RESULTS_QUEUE,
    STORE_RESULT_FUNCTION,
)
from jobs.settings import JobsSettings
from sdapi.consul import open_consul
from sdapi.queue import deserialize, redis_settings, serialize
from web.db import open_database
from web.registry import NodeRegistry

log = logging.getLogger(__name__)

RESOURCES = "sdapi"  # the key of `JobsResources` on arq's ctx


@dataclass
class SmtpBackoff:
    """This process's view of an SMTP server that is down: when to try it again."""

    failures: int = 0  # server-level failures in a row
    retry_at: float = 0.0  # time.monotonic() before which no round tries it


@dataclass
class JobsResources:
    """What the jobs worker holds while it runs."""

    settings: JobsSettings
    redis: ArqRedis
    registry: NodeRegistry
    stack: contextlib.AsyncExitStack
    loops: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    smtp_backoff: SmtpBackoff = field(default_factory=SmtpBackoff)


def resources(ctx: dict[str, Any]) -> JobsResources:
    """The typed resources on an arq ctx."""
    found: JobsResources = ctx[RESOURCES]
    return found


# A periodic task; what it returns (a count, a report) is ignored.
Periodic = Callable[[JobsResources], Awaitable[object]]


async def _every(
    name: str, interval: float, task: Periodic, res: JobsResources
) -> None:
    """Run `task` every `interval` seconds until the worker stops; log failures."""
    while not res.stopping.is_set():
        try:
            await task(res)
        except Exception:
            log.exception("periodic task %s failed; retrying in %.1fs", name, interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(res.stopping.wait(), timeout=interval)


def periodic_tasks(settings: JobsSettings) -> list[tuple[str, float, Periodic]]:
    """The periodic tasks of the worker, with their intervals in seconds."""
    from jobs.dispatcher import dispatch_due
    from jobs.outbox import send_due_emails
    from jobs.reconciler import reconcile

    return [
        ("outbox", settings.outbox_interval, send_due_emails),
        ("dispatch", settings.dispatch_interval, dispatch_due),
        ("reconcile", settings.reconcile_interval, reconcile),
    ]


async def on_startup(ctx: dict[str, Any]) -> None:
    """Open the database and registry; start the periodic tasks."""
    settings: JobsSettings = ctx["settings"]
    stack = contextlib.AsyncExitStack()
    try:
        await stack.enter_async_context(open_database(settings.database_url or ""))
        consul = None
        if settings.consul_url:
            consul = await stack.enter_async_context(open_consul(settings.consul_url))
    except BaseException:
        await stack.aclose()
        raise
    redis: ArqRedis = ctx["redis"]
    res = JobsResources(
        settings=settings,
        redis=redis,
        registry=NodeRegistry(redis, consul),
        stack=stack,
    )
    ctx[RESOURCES] = res
    for name, interval, task in periodic_tasks(settings):
        res.loops.append(
            asyncio.create_task(_every(name, interval, task, res), name=f"sdapi-{name}")
        )
    log.info("jobs worker started (queue %s)", RESULTS_QUEUE)


async def on_shutdown(ctx: dict[str, Any]) -> None:
    """Let the periodic tasks finish their round, then close everything."""
    res = ctx.get(RESOURCES)
    if res is None:
        return
    res.stopping.set()
    await asyncio.gather(*res.loops, return_exceptions=True)
    await res.stack.aclose()


def job_functions() -> list[Any]:
    """The arq functions of the results queue."""
    from jobs.results import (
        MARK_STARTED_MAX_TRIES,
        STORE_RESULT_MAX_TRIES,
        mark_started,
        store_result,
    )

    return [
        func(
            store_result, name=STORE_RESULT_FUNCTION, max_tries=STORE_RESULT_MAX_TRIES
        ),
        func(
            mark_started, name=MARK_STARTED_FUNCTION, max_tries=MARK_STARTED_MAX_TRIES
        ),
    ]


def build_worker(settings: JobsSettings, **overrides: Any) -> Worker:
    """The jobs worker for resolved `settings`."""
    options: dict[str, Any] = {
        "functions": job_functions(),
        "queue_name": RESULTS_QUEUE,
        "redis_settings": redis_settings(settings.redis_url or ""),
        "job_serializer": serialize,
        "job_deserializer": deserialize,
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        "ctx": {"settings": settings},
        # `sdapi jobs` is woken by each enqueue (jobs.main); polling is the
        # fallback for a wake-up lost while Redis restarted.
        "poll_delay": 0.2,
        "max_jobs": 20,
        "job_timeout": 120,
        # A result key keeps the payload a node sent: as long as the images
        # it names live, the reconciler can store a result whose job failed.
        "keep_result": IMAGE_TTL_S,
    }
    options.update(overrides)
    return Worker(**options)

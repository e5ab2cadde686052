"""`sdapi jobs`: settings built once, the worker factory, then run."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from jobs.settings import JobsSettings
from jobs.worker import build_worker
from sdapi.contract.names import RESULTS_QUEUE, wake_channel
from sdapi.infra import loops
from sdapi.infra.logs import setup_logging
from sdapi.infra.pubsub import Listener, setter
from sdapi.infra.queue import create_queue_pool, poll_when_woken

log = logging.getLogger(__name__)

# On SIGTERM/SIGINT, running jobs (storing results) get this long to finish
# before they are cancelled and re-queued (seconds).
SHUTDOWN_GRACE_S = 20


async def serve(settings: JobsSettings) -> None:
    """Run the worker until a signal stops it."""
    # Built inside the loop: arq binds its signal handlers to the running loop.
    worker = build_worker(settings, job_completion_wait=SHUTDOWN_GRACE_S)
    # Nodes publish a wake-up with every result: store it now, not at the next
    # poll (the `done` event, and the OpenAI route's answer, wait for it).
    wakeups = await create_queue_pool(settings.redis_url or "")
    woken = asyncio.Event()
    listener = Listener(wakeups, {wake_channel(RESULTS_QUEUE): setter(woken)})
    helpers = [
        asyncio.create_task(listener.run(), name="pubsub"),
        asyncio.create_task(poll_when_woken(worker, woken), name="wake"),
    ]
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.async_run()
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await worker.close()
        await wakeups.aclose()


def run() -> int:
    """Run the jobs worker until SIGINT/SIGTERM."""
    configured = JobsSettings.from_env()
    settings = configured.resolved()
    setup_logging(settings.log_level)
    if configured.database_url and "public_url" not in configured.model_fields_set:
        log.warning(
            "SDAPI_PUBLIC_URL is not set: links in emails point to %s",
            settings.public_url,
        )
    loops.run(serve(settings))
    return 0

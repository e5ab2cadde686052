"""`sdapi jobs`: settings built once, the worker factory, then run."""

from __future__ import annotations

import asyncio
import contextlib

from jobs.settings import JobsSettings
from jobs.worker import build_worker
from sdapi.logs import setup_logging

# On SIGTERM/SIGINT, running jobs (storing results) get this long to finish
# before they are cancelled and re-queued (seconds).
SHUTDOWN_GRACE_S = 20


async def serve(settings: JobsSettings) -> None:
    """Run the worker until a signal stops it."""
    # Built inside the loop: arq binds its signal handlers to the running loop.
    worker = build_worker(settings, job_completion_wait=SHUTDOWN_GRACE_S)
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.async_run()
    finally:
        await worker.close()


def run() -> int:
    """Run the jobs worker until SIGINT/SIGTERM."""
    settings = JobsSettings.from_env().resolved()
    setup_logging(settings.log_level)
    asyncio.run(serve(settings))
    return 0

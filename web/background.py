"""Work a request starts and answers before: owned by the app, drained on close."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Background:
    """The app's fire-and-forget tasks: each one kept referenced until it ends
    (asyncio holds only weak references), its failure logged, and the rest
    given time to finish when the app stops."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None], *, name: str) -> None:
        """Run `work` without waiting for it."""
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("background task %s failed", task.get_name(), exc_info=error)

    async def idle(self) -> None:
        """Return once every task started so far, and any they started, ended."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self, *, drain_s: float) -> None:
        """Let running tasks finish for up to `drain_s` seconds, then cancel."""
        if not self._tasks:
            return
        _, late = await asyncio.wait(list(self._tasks), timeout=drain_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("cancelled %d background tasks at shutdown", len(late))
            await asyncio.wait(late)

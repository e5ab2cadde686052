"""One request's time budget for a dependency, shared by every call it makes.

A deadline per command lets a request that makes N calls take N times as long
while the dependency stalls; a `Deadline` caps their sum instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Coroutine
from typing import TypeVar

T = TypeVar("T")


class Deadline:
    """A budget (seconds) counted from its creation."""

    def __init__(self, budget_s: float) -> None:
        self._ends_at = time.monotonic() + budget_s

    def remaining(self) -> float:
        """Seconds left, 0 once spent."""
        return max(0.0, self._ends_at - time.monotonic())

    @property
    def spent(self) -> bool:
        return self.remaining() <= 0

    async def run(self, call: Awaitable[T]) -> T:
        """`call` awaited within what is left: TimeoutError when the budget runs
        out meanwhile, and at once (without starting it) when it is spent."""
        left = self.remaining()
        if left <= 0:
            if isinstance(call, Coroutine):
                # Never awaited: closed, so Python does not warn about it.
                call.close()
            raise TimeoutError("the request's time budget is spent")
        async with asyncio.timeout(left):
            return await call

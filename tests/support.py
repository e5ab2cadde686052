"""What every suite shares: waiting on a condition instead of a fixed sleep.

`until` (async) and `until_sync` (for sync code: fixtures that start
subprocesses, Playwright) poll a check until it returns something truthy and
return that. A test waits as long as the machine needs and no longer; a
`timeout` is only how long to wait before calling it a failure. Users for
tests come from `sdapi.devtools.accounts.make_user` (benchmarks use it too).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import pytest

T = TypeVar("T")

# Between two checks (seconds): short, as a check is cheap next to the waits;
# longer while watching subprocesses, whose CPU every check (a query, a log
# read) takes from on a small machine.
EVERY_S = 0.02
WATCHED_EVERY_S = 0.1


class Watch(Protocol):
    """Processes a wait gives up on as soon as one of them dies."""

    def failure(self) -> str | None:
        """What died unexpectedly, or None."""

    def logs(self) -> str:
        """Their logs, for the message of a wait that timed out."""


def _pause(every: float | None, watch: Watch | None) -> float:
    if every is not None:
        return every
    return EVERY_S if watch is None else WATCHED_EVERY_S


def _give_up(deadline: float, timeout: float, what: str, watch: Watch | None) -> None:
    if watch is not None and (failure := watch.failure()) is not None:
        pytest.fail(f"waiting for {what}: {failure}")
    if time.monotonic() > deadline:
        logs = f"\n{watch.logs()}" if watch is not None else ""
        pytest.fail(f"{what}: not within {timeout} s{logs}")


async def until(
    check: Callable[[], Awaitable[T] | T],
    timeout: float = 30.0,
    what: str = "the condition",
    watch: Watch | None = None,
    *,
    every: float | None = None,
) -> T:
    """Call `check` (sync or async) until it returns something truthy; that."""
    pause = _pause(every, watch)
    deadline = time.monotonic() + timeout
    while True:
        value: Any = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[no-any-return]
        _give_up(deadline, timeout, what, watch)
        await asyncio.sleep(pause)


def until_sync(
    check: Callable[[], T],
    timeout: float = 30.0,
    what: str = "the condition",
    watch: Watch | None = None,
    *,
    every: float | None = None,
) -> T:
    """`until` for code that cannot await (it blocks the calling thread)."""
    pause = _pause(every, watch)
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        _give_up(deadline, timeout, what, watch)
        time.sleep(pause)

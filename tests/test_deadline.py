"""A request's Redis budget: shared by its calls, spent once for all of them."""

from __future__ import annotations

import asyncio
import time

import pytest

from sdapi.infra.deadline import Deadline


async def test_calls_share_one_budget_and_none_starts_once_it_is_spent() -> None:
    deadline = Deadline(0.2)
    assert await deadline.run(asyncio.sleep(0, result="quick")) == "quick"
    never = asyncio.Event()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await deadline.run(never.wait())
    assert deadline.spent and time.monotonic() - started < 1.0
    began = []

    async def call() -> None:
        began.append(True)

    # Spent: the next call fails at once, without being started (nor left
    # unawaited, which would warn).
    with pytest.raises(TimeoutError):
        await deadline.run(call())
    assert began == []

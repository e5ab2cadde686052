"""The GPU executor: one thread, premium first, nested at step boundaries."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from gpu_node.executor import GpuExecutor
from gpu_node.progress import CallObserver
from gpu_node.schemas import ProgressEvent


def test_premium_overtakes_queued_batches_and_nests_at_steps() -> None:
    executor = GpuExecutor()
    order: list[str] = []
    gate = threading.Event()
    premium_waiting = threading.Event()

    def batch() -> str:
        gate.wait(5)
        for step in range(3):
            order.append(f"batch step {step}")
            if step == 0:
                premium_waiting.wait(5)
            executor.run_pending_premium()
        return "batch"

    def premium(name: str) -> str:
        order.append(name)
        return name

    try:
        first = executor.submit(batch, premium=False)
        second = executor.submit(lambda: order.append("second batch"), premium=False)
        gate.set()
        time.sleep(0.05)
        nested = executor.submit(lambda: premium("premium"), premium=True)
        premium_waiting.set()
        assert first.result(5) == "batch" and nested.result(5) == "premium"
        second.result(5)
        assert order == [
            "batch step 0",
            "premium",
            "batch step 1",
            "batch step 2",
            "second batch",
        ]
        with pytest.raises(RuntimeError, match="GPU thread only"):
            executor.run_pending_premium()
    finally:
        executor.shutdown(5)
    assert not executor.alive


def test_errors_reach_the_caller() -> None:
    executor = GpuExecutor()
    try:

        def boom() -> None:
            raise ValueError("no")

        with pytest.raises(ValueError, match="no"):
            executor.submit(boom, premium=True).result(5)
        assert executor.submit(lambda: 3, premium=False).result(5) == 3
    finally:
        executor.shutdown(5)


def test_progress_is_throttled_but_the_last_step_always_goes() -> None:
    class Publisher:
        def __init__(self) -> None:
            self.events: list[ProgressEvent] = []

        def emit(self, key: str, event: ProgressEvent) -> None:
            self.events.append(event)

    class NoCancels:
        def cancelled(self, ids: list[str]) -> set[str]:
            return set()

    publisher = Publisher()
    observer = CallObserver(
        ["g"],
        publisher,  # type: ignore[arg-type]
        NoCancels(),  # type: ignore[arg-type]
        preview_every=2,
        min_interval_s=0.05,
    )
    asked = []
    for step in range(1, 11):
        keys = observer.preview_keys(step)
        asked.append(bool(keys))
        observer.on_step(step, 10, dict.fromkeys(keys, b"jpeg"))
        time.sleep(0.02)
    steps = [event.step for event in publisher.events]
    # 20 ms steps against a 50 ms interval: about every third step, then the last.
    assert steps[0] == 1 and steps[-1] == 10
    assert 3 <= len(steps) <= 6
    # (gaps between throttled sends; the last step may follow any step)
    assert all(b - a >= 2 for a, b in itertools.pairwise(steps[:-1]))
    # Previews are only computed for steps that are sent.
    assert sum(asked) == sum(event.preview is not None for event in publisher.events)

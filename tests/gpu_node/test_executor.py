"""The GPU executor: one thread, premium first, nested at step boundaries."""

from __future__ import annotations

import threading
import time

import pytest

from gpu_node.executor import GpuExecutor


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

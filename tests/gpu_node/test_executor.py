"""The GPU executor: one thread, premium first, nested at step boundaries."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from gpu_node import progress
from gpu_node.calls import (
    CallItem,
    CallStopped,
    Engine,
    PipelineCall,
    QuietObserver,
)
from gpu_node.executor import GpuExecutor
from gpu_node.progress import CallObserver, ItemProgress
from sdapi.contract.events import ProgressEvent
from tests.support import until_sync


def test_premium_overtakes_queued_batches_and_nests_at_steps() -> None:
    executor = GpuExecutor()
    order: list[str] = []
    gate = threading.Event()
    at_first_step = threading.Event()
    premium_waiting = threading.Event()

    def batch() -> str:
        gate.wait(5)
        for step in range(3):
            order.append(f"batch step {step}")
            if step == 0:
                at_first_step.set()
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
        assert at_first_step.wait(5)
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


class _Publisher:
    def __init__(self) -> None:
        self.events: list[tuple[str, ProgressEvent]] = []

    def emit(self, key: str, event: ProgressEvent) -> None:
        self.events.append((key, event))


class _NoCancels:
    def cancelled(self, ids: list[str]) -> set[str]:
        return set()


def _observer(
    progress: dict[str, ItemProgress], publisher: _Publisher, **options: Any
) -> CallObserver:
    values: dict[str, Any] = {"preview_every": 0, "min_interval_s": 0.0}
    values.update(options)
    return CallObserver(
        progress,
        publisher,  # type: ignore[arg-type]
        _NoCancels(),  # type: ignore[arg-type]
        **values,
    )


def test_progress_is_throttled_but_the_last_step_always_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The observer's clock, moved by hand: 20 ms a step.
    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))
    publisher = _Publisher()
    observer = _observer(
        {"g": ItemProgress(10)}, publisher, preview_every=2, min_interval_s=0.05
    )
    rendered: list[int] = []

    def preview(key: str) -> bytes:
        rendered.append(len(rendered))
        return b"jpeg"

    for step in range(1, 11):
        now[0] = step * 0.02
        observer.on_step(step, 10, preview)
    steps = [event.step for _, event in publisher.events]
    # 20 ms steps against a 50 ms interval: every third step, then the last.
    assert steps == [1, 4, 7, 10]
    # Previews are only rendered for steps that are sent.
    assert len(rendered) == sum(e.preview is not None for _, e in publisher.events)


def test_a_step_is_timed_without_the_premium_work_nested_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The observer's clock, moved by hand: 100 ms a step, and a premium call
    # of 500 ms nested after step 2.
    now = [0.0]
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: now[0]))

    class Executor:
        def run_pending_premium(self) -> float:
            if now[0] == pytest.approx(0.2):
                now[0] += 0.5
                return 0.5
            return 0.0

    observer = _observer(
        {"g": ItemProgress(5)},
        _Publisher(),
        executor=Executor(),  # type: ignore[arg-type]
    )
    assert observer.step_s is None
    for step in range(1, 6):
        now[0] += 0.1
        observer.on_step(step, 5, lambda key: None)
    assert observer.yielded_s == pytest.approx(0.5)
    assert observer.timed_steps == 4
    assert observer.step_s == pytest.approx(0.1)


def test_progress_counts_in_the_generations_steps_across_calls() -> None:
    publisher = _Publisher()
    # Five steps, images in two calls; PNDM runs one more iteration per call.
    item = ItemProgress(5, calls=2)
    for _call in range(2):
        observer = _observer({"g": item}, publisher)
        for step in range(1, 7):
            observer.on_step(step, 6, lambda key: None)
        item.call_done()
    reported = [(e.step, e.total) for _, e in publisher.events]
    assert reported == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]

    # Out of memory in the first of two calls: it is split in two and run
    # again, and progress never goes back.
    publisher.events.clear()
    item = ItemProgress(4, calls=2)
    observer = _observer({"g": item}, publisher)
    for step in range(1, 4):
        observer.on_step(step, 4, lambda key: None)
    item.resplit(2)
    for _call in range(3):
        observer = _observer({"g": item}, publisher)
        for step in range(1, 5):
            observer.on_step(step, 4, lambda key: None)
        item.call_done()
    steps = [e.step for _, e in publisher.events]
    assert steps == sorted(set(steps)) and steps[-1] == 4
    assert {e.total for _, e in publisher.events} == {4}


def test_a_lost_claim_stops_the_call_at_the_next_step() -> None:
    stop = threading.Event()
    observer = _observer({"g": ItemProgress(3)}, _Publisher(), stop=stop)
    observer.on_step(1, 3, lambda key: None)
    stop.set()
    with pytest.raises(CallStopped):
        observer.on_step(2, 3, lambda key: None)


def test_time_in_nested_premium_calls_is_counted() -> None:
    executor = GpuExecutor()
    batch_running = threading.Event()
    premium_waiting = threading.Event()
    try:

        def batch() -> float:
            batch_running.set()
            premium_waiting.wait(5)
            return executor.run_pending_premium()

        outer = executor.submit(batch, premium=False)
        batch_running.wait(5)
        # Real time is what is counted: the nested call takes 0.2 s of it.
        nested = executor.submit(lambda: time.sleep(0.2), premium=True)
        premium_waiting.set()
        nested.result(5)
        assert outer.result(5) >= 0.2
    finally:
        executor.shutdown(5)


def test_premium_work_does_not_nest_in_premium_work() -> None:
    executor = GpuExecutor()
    order: list[str] = []
    batch_running = threading.Event()
    premium_waiting = threading.Event()
    try:

        def first() -> None:
            order.append("first")
            # A second premium call is waiting: it runs after this one, not
            # inside it (its VAE decode passes the batch's hook too).
            assert executor.run_pending_premium() == 0.0
            order.append("first done")

        def batch() -> None:
            batch_running.set()
            premium_waiting.wait(5)
            executor.run_pending_premium()
            order.append("batch goes on")

        outer = executor.submit(batch, premium=False)
        batch_running.wait(5)
        one = executor.submit(first, premium=True)
        two = executor.submit(lambda: order.append("second"), premium=True)
        premium_waiting.set()
        for future in (outer, one, two):
            future.result(5)
        assert order == ["first", "first done", "second", "batch goes on"]
    finally:
        executor.shutdown(5)


def test_a_batch_yields_to_premium_work_between_decoded_images(
    tiny_engine: Engine,
) -> None:
    seen: list[str] = []

    class Recording(QuietObserver):
        def on_step(
            self, step: int, total: int, preview: Callable[[str], bytes | None]
        ) -> None:
            seen.append(f"step {step}")

        def between_images(self) -> None:
            seen.append("decode")

    call = PipelineCall(
        64, 64, 2, 7.5, "euler_a", (CallItem("g", "a castle", "", (1, 2, 3)),)
    )
    images = tiny_engine.run(call, Recording())["g"]
    # The VAE decodes the three images one at a time, with a yield before each.
    assert len(images) == 3
    assert seen == ["step 1", "step 2", "decode", "decode", "decode"]


def test_a_failed_call_keeps_nothing_alive() -> None:
    # A failed call's frames (on a GPU: its activations and latents) must be
    # freed when the caller lets go of the error, not at a later collection.
    executor = GpuExecutor()

    class Held:
        pass

    refs: list[weakref.ref[Held]] = []

    def fail() -> None:
        held = Held()
        refs.append(weakref.ref(held))
        raise ValueError("out of memory")

    gc.disable()
    try:
        future = executor.submit(fail, premium=True)
        assert isinstance(future.exception(5), ValueError)
        del future
        # The thread lets go of the task once it is back waiting for work.
        until_sync(lambda: refs[0]() is None, 5, "the failed call's frames to go")
    finally:
        gc.enable()
        executor.shutdown(5)

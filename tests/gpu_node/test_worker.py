"""Pieces of the node's job handling that need no model."""

from __future__ import annotations

import asyncio
import threading
import uuid
from concurrent.futures import Future

import pytest

from gpu_node.delivery import named_generations as _named_generations
from gpu_node.runner import await_thread as _await_thread


def _finish_when(release: threading.Event, value: str) -> Future[str]:
    """Work on another thread that ends once `release` is set."""
    future: Future[str] = Future()

    def work() -> None:
        future.set_running_or_notify_cancel()
        release.wait(timeout=30)
        future.set_result(value)

    threading.Thread(target=work, daemon=True).start()
    return future


async def test_time_given_to_premium_work_moves_a_deadline() -> None:
    loop = asyncio.get_running_loop()
    aborted = threading.Event()
    release = threading.Event()
    # The first look at the deadline finds it about to pass; by the next, time
    # given to nested premium calls has moved it an hour on, and the work ends.
    looks = []

    def deadline() -> float:
        looks.append(loop.time())
        if len(looks) == 1:
            return loop.time() + 0.01
        release.set()
        return loop.time() + 3600

    done = await _await_thread(_finish_when(release, "done"), deadline, aborted.set)
    assert done == "done" and not aborted.is_set()
    # It waited past the first deadline instead of giving up at it.
    assert len(looks) >= 2


async def test_work_past_its_deadline_is_stopped_and_awaited() -> None:
    loop = asyncio.get_running_loop()
    aborted = threading.Event()
    # The thread stops only when told to, as a pipeline at a step boundary.
    work = _finish_when(aborted, "late")
    passed = loop.time()
    with pytest.raises(TimeoutError):
        await _await_thread(work, lambda: passed, aborted.set)
    assert aborted.is_set()
    assert work.done()  # awaited before the TimeoutError was raised


def test_ids_are_read_from_a_payload_that_fails_validation() -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    assert _named_generations({"generation_id": str(first), "params": {}}) == [
        (first, 1)
    ]
    batch = {
        "items": [
            {"generation_id": str(first), "attempt": 3},
            {"generation_id": "not a uuid"},
            "junk",
            {"generation_id": str(second)},
        ]
    }
    assert _named_generations(batch) == [(first, 3), (second, 1)]
    assert _named_generations({"prompt": "no id"}) == []
    assert _named_generations(["not", "a", "dict"]) == []
    assert _named_generations({"items": "nope"}) == []

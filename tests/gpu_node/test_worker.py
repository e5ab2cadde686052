"""Pieces of the node's job handling that need no model."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import Future

import pytest

from gpu_node.delivery import named_generations as _named_generations
from gpu_node.runner import await_thread as _await_thread


def _finish_after(seconds: float, value: str) -> Future[str]:
    future: Future[str] = Future()

    def work() -> None:
        future.set_running_or_notify_cancel()
        time.sleep(seconds)
        future.set_result(value)

    threading.Thread(target=work, daemon=True).start()
    return future


async def test_time_given_to_premium_work_moves_a_deadline() -> None:
    loop = asyncio.get_running_loop()
    aborted = threading.Event()
    # A call that needs 0.3 s against a 0.1 s limit, of which 0.4 s went to
    # nested premium calls (reported while it runs).
    yielded = [0.0]
    start = loop.time()
    loop.call_later(0.05, lambda: yielded.__setitem__(0, 0.4))
    done = await _await_thread(
        _finish_after(0.3, "done"), lambda: start + 0.1 + yielded[0], aborted.set
    )
    assert done == "done" and not aborted.is_set()

    start = loop.time()
    with pytest.raises(TimeoutError):
        await _await_thread(
            _finish_after(0.3, "late"), lambda: start + 0.1, aborted.set
        )
    assert aborted.is_set()


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

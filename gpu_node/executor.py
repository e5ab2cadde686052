"""The GPU executor: one thread, premium work first, nested at step boundaries.

Every pipeline call of a node runs on this one thread, so the device runs one
call at a time. Premium work waits in its own queue; a running batch calls
`run_pending_premium()` at each denoising step boundary and before the VAE
decodes each of its images, which runs the waiting premium calls right there
(nested, on the same thread) before the batch goes on, its own state
untouched. Premium work never nests inside premium work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_Task = tuple[Callable[[], Any], "Future[Any]"]


class GpuExecutor:
    """Runs callables on one thread; premium ones first and at step boundaries."""

    def __init__(self, name: str = "gpu") -> None:
        self._premium: deque[_Task] = deque()
        self._batch: deque[_Task] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._busy = False
        # Premium work is running nested in a batch: it does not nest further
        # (its own VAE decode passes the batch's hook).
        self._nested = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def busy(self) -> bool:
        """Whether a call is running now."""
        return self._busy

    def submit(self, fn: Callable[[], T], *, premium: bool) -> Future[T]:
        """Queue `fn`; premium work overtakes batches and preempts a running one."""
        future: Future[T] = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the GPU executor is shut down")
            (self._premium if premium else self._batch).append((fn, future))
            self._wake.notify()
        return future

    def pending_premium(self) -> int:
        """Premium calls waiting for the device."""
        return len(self._premium)

    def run_pending_premium(self) -> float:
        """Run the waiting premium calls now (GPU thread only); seconds spent."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("run_pending_premium is for the GPU thread only")
        if self._nested:
            return 0.0
        started = time.monotonic()
        self._nested = True
        try:
            while True:
                with self._wake:
                    if not self._premium:
                        return time.monotonic() - started
                    task = self._premium.popleft()
                self._run(task)
                del task
        finally:
            self._nested = False

    @staticmethod
    def _run(task: _Task) -> None:
        fn, future = task
        del task
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn()
        except BaseException as exc:
            future.set_exception(exc)
            # As the stdlib thread pool does: the exception's traceback holds
            # this frame, which holds the future, which holds the exception.
            # Break that cycle now, so whatever the failed call's frames held
            # (device tensors after an out-of-memory) is freed before the next
            # call rather than at some later garbage collection.
            del fn, future
        else:
            future.set_result(result)

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._premium and not self._batch and not self._closed:
                    self._wake.wait()
                if self._premium:
                    task = self._premium.popleft()
                elif self._batch:
                    task = self._batch.popleft()
                else:
                    return
            self._busy = True
            try:
                self._run(task)
            finally:
                # Not kept alive while the thread waits for the next call.
                del task
                self._busy = False

    def shutdown(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the thread (blocking: call in a thread)."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout)

"""The threads that decode uploaded images: a few at a time, a share per user.

Decoding a large image takes seconds of CPU. On the default thread pool, one
user's burst of uploads would queue ahead of everyone's bcrypt and file work;
here decodes have threads of their own, and a user holds (running or waiting)
at most `per_user` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from web.errors import RateLimited, Unavailable

T = TypeVar("T")


@dataclass
class _Share:
    slots: asyncio.Semaphore
    # Requests holding or waiting for one of the slots: the share is dropped
    # when none is left, so idle users cost nothing.
    users: int = field(default=0)


async def _acquire_by(semaphore: asyncio.Semaphore, ends_at: float) -> bool:
    try:
        async with asyncio.timeout_at(ends_at):
            await semaphore.acquire()
    except TimeoutError:
        return False
    return True


class DecodePool:
    """`workers` decoding threads; each user may hold `per_user` of them."""

    def __init__(self, *, workers: int, per_user: int, wait_s: float) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="decode"
        )
        self._free = asyncio.Semaphore(workers)
        self._per_user = per_user
        self._wait_s = wait_s
        self._shares: dict[uuid.UUID, _Share] = {}
        # Decodes started since the pool opened (tests and metrics read it).
        self.started = 0

    @contextlib.asynccontextmanager
    async def slot(self, user_id: uuid.UUID) -> AsyncIterator[None]:
        """One of the user's slots, then one of the pool's, each waited for at
        most `wait_s` in all: a 429 when the user's own decodes fill their
        share, a 503 when everyone's fill the pool."""
        share = self._shares.get(user_id)
        if share is None:
            share = self._shares[user_id] = _Share(asyncio.Semaphore(self._per_user))
        share.users += 1
        ends_at = asyncio.get_running_loop().time() + self._wait_s
        try:
            if not await _acquire_by(share.slots, ends_at):
                raise RateLimited(
                    f"You already have {self._per_user} images being checked; "
                    "send the next one when they are done.",
                    retry_after=max(1, round(self._wait_s)),
                )
            try:
                if not await _acquire_by(self._free, ends_at):
                    raise Unavailable(
                        "Too many images are being checked right now; try again "
                        "shortly.",
                        retry_after=max(1, round(self._wait_s)),
                    )
                try:
                    yield
                finally:
                    self._free.release()
            finally:
                share.slots.release()
        finally:
            share.users -= 1
            if share.users == 0:
                del self._shares[user_id]

    async def run(self, user_id: uuid.UUID, work: Callable[[], T]) -> T:
        """`work()` on a decoding thread, in one of the user's slots."""
        async with self.slot(user_id):
            self.started += 1
            future = asyncio.get_running_loop().run_in_executor(self._executor, work)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                # A thread cannot be stopped: its slot stays taken until it
                # ends, or a client could hang up and resend past its share.
                await asyncio.wait([future])
                raise

    async def close(self) -> None:
        """Let running decodes end (in a thread: it may take seconds)."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

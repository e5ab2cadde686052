"""Redis connections whose write deadline never loses a task's cancellation.

redis-py 5 writes each command under `asyncio.wait_for` when the connection
has a socket timeout. On Python 3.11, `wait_for` hands back the result of a
call that finished in the same pass of the event loop in which its caller was
cancelled, and the cancellation is gone (CPython gh-86296; 3.12 rebuilt
`wait_for` on `asyncio.timeout`). A task cancelled while it sends a command
then runs on, and whoever awaits it waits for ever: a web replica's shutdown
hung on its Consul watch that way, and 120 of 300 tasks cancelled in a loop
of HMGETs ran on (tests/test_redis_writes.py). `asyncio.timeout` keeps the
cancellation, so the write is bounded by it here; reads already are. A
write that fails aborts its connection rather than closing it, so no half
sent command reaches the server later.

The private names used (`_send_packed_command`, `_writer`) are pinned in
tests/test_private_apis.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


class _DeadlineWrites(AbstractConnection):
    """Put before a redis-py connection class: its writes under `asyncio.timeout`."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if not self.socket_timeout:
            # No deadline: redis-py writes without wait_for.
            await super().send_packed_command(command, check_health)
            return
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]
        elif check_health:
            await self.check_health()  # type: ignore[no-untyped-call]
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            async with asyncio.timeout(self.socket_timeout):
                await self._send_packed_command(command)
        except TimeoutError:
            await self._drop()
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self._drop()
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            await self._drop()
            raise

    async def _drop(self) -> None:
        # What was half sent cannot be taken back, so the connection goes, as
        # in redis-py, but aborted: a graceful close would still send the
        # rest to a server that wakes later, which would then run a command
        # its caller was told had failed.
        if self._writer is not None:
            self._writer.transport.abort()
        await self.disconnect(nowait=True)


def keeping_cancellation(
    connection_class: type[AbstractConnection],
) -> type[AbstractConnection]:
    """`connection_class` (plain, TLS or Unix socket) with deadline-bound
    writes that keep a cancellation."""
    if issubclass(connection_class, _DeadlineWrites):
        return connection_class
    return type(
        f"DeadlineWrites{connection_class.__name__}",
        (_DeadlineWrites, connection_class),
        {},
    )

"""A TCP proxy a test puts in front of a real server to make it slow or gone.

`pause()` stops moving bytes both ways (a server that stalls mid-answer, a
network that hangs), `resume()` moves them again; `close()` refuses new
connections and cuts the open ones (a server stopped). It runs its own event
loop in a thread, so sync tests, async tests and subprocesses can all use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_PIECE = 64 * 1024


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tcp-proxy", daemon=True
        )
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.connections = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout=10)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def pause(self) -> None:
        """Hold every byte from now on, in both directions."""
        self._call(self._flow(False))

    def resume(self) -> None:
        if not self._loop.is_closed():
            self._call(self._flow(True))

    async def _flow(self, flowing: bool) -> None:
        if flowing:
            self._event().set()
        else:
            self._event().clear()

    def _event(self) -> asyncio.Event:
        assert self._flowing is not None, "start() the proxy first"
        return self._flowing

    def close(self) -> None:
        """Refuse connections from now on and cut the open ones; the port
        stays unused (connection refused) until the test ends."""
        if self._thread.is_alive():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if self._server is not None:
            await self._server.wait_closed()
        # The pipes end on the aborted transports; let them finish.
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.wait(pending, timeout=5) if pending else None

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer)
            )
        finally:
            for end in (writer, up_writer):
                self._writers.discard(end)
                end.transport.abort()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        flowing = self._event()
        with contextlib.suppress(OSError):
            while True:
                await flowing.wait()
                piece = await reader.read(_PIECE)
                if not piece:
                    break
                # A pause that began while reading holds this piece too.
                await flowing.wait()
                writer.write(piece)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

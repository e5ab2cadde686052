"""A local SMTP server that keeps every message as a `.eml` file (for `sdapi dev`).

Nothing leaves the machine: open the files with any mail client, or read them
in tests. The server (aiosmtpd) runs in its own thread with its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

# aiosmtpd cannot listen on port 0; `free_port` stays importable from here.
from sdapi.devtools.net import LOOPBACK, free_port

log = logging.getLogger(__name__)

HOST = LOOPBACK


class FolderHandler:
    """aiosmtpd handler: writes each message to `folder` as a `.eml` file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _write(self, content: bytes) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        path = self.folder / f"{stamp}-{uuid.uuid4().hex[:12]}.eml"
        # Written aside, then renamed: a reader never sees half a message.
        partial = path.with_suffix(".part")
        partial.write_bytes(content)
        os.replace(partial, path)
        return path

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Keep the message; 250 when it is on disk."""
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        path = await asyncio.to_thread(self._write, content)
        log.info(
            "mail from %s to %s kept in %s",
            envelope.mail_from,
            ", ".join(envelope.rcpt_tos),
            path,
        )
        return "250 Message accepted for delivery"


def read_messages(folder: Path) -> list[bytes]:
    """The messages kept in `folder`, oldest first (tests and tools)."""
    paths = sorted(folder.glob("*.eml"), key=lambda path: (path.stat().st_mtime, path))
    return [path.read_bytes() for path in paths]


@contextlib.contextmanager
def mail_sink(
    folder: Path, *, host: str = HOST, port: int | None = None
) -> Iterator[str]:
    """Run a sink keeping mail in `folder`; yield its smtp:// URL."""
    folder.mkdir(parents=True, exist_ok=True)
    controller = Controller(
        FolderHandler(folder), hostname=host, port=port or free_port(host)
    )
    controller.start()
    url = f"smtp://{host}:{controller.port}"
    log.info("mail sink at %s keeps messages in %s", url, folder)
    try:
        yield url
    finally:
        controller.stop()

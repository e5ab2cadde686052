"""`sdapi web`: settings built once, the app factory, then serve."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from sdapi.infra import loops
from sdapi.infra.logs import setup_logging
from web.app import create_app
from web.protocol import ApiRunner
from web.settings import WebSettings

log = logging.getLogger("web")

# How long open requests and WebSockets get to finish on SIGTERM (seconds).
SHUTDOWN_TIMEOUT_S = 10


async def serve(app: web.Application, settings: WebSettings) -> None:
    """Serve `app` until SIGINT or SIGTERM, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner = ApiRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        log.info("serving on %s", settings.base_url)
        await stop.wait()
    finally:
        await runner.cleanup()


def run() -> int:
    """Serve the web app until SIGINT/SIGTERM."""
    settings = WebSettings.from_env().resolved()
    setup_logging(settings.log_level)
    loops.run(serve(create_app(settings), settings))
    return 0

"""`sdapi web`: settings built once, the app factory, then serve."""

from __future__ import annotations

import logging

from aiohttp import web

from sdapi.infra import loops
from sdapi.infra.logs import setup_logging
from web.app import create_app
from web.settings import WebSettings


def run() -> int:
    """Serve the web app until SIGINT/SIGTERM."""
    settings = WebSettings.from_env().resolved()
    setup_logging(settings.log_level)
    app = create_app(settings)
    logging.getLogger("web").info("serving on %s", settings.base_url)
    web.run_app(
        app,
        loop=loops.new_event_loop(),
        host=settings.host,
        port=settings.port,
        print=None,
        access_log=None,
        shutdown_timeout=10,
    )
    return 0

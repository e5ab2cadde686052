"""Answering synchronously: waiting for a generation to end, within a time.

The OpenAI and AUTOMATIC1111 routes submit an ordinary premium generation
and answer once it has ended; nobody collects one they gave up on (a
timeout, a client that hung up), so it is cancelled: its GPU time and the
caller's in-flight slot are freed.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from sdapi.contract.events import DoneEvent
from sdapi.contract.status import Status
from sdapi.db.models import Generation
from web.errors import GatewayTimeout, GenerationFailed, Gone
from web.generations import cancel_generation
from web.live import wait_until_done

# How often a waiting handler looks whether its client is still connected
# (seconds): aiohttp does not cancel handlers when one hangs up.
CLIENT_CHECK_S = 1.0


async def _client_gone(request: web.Request) -> None:
    """Returns once the request's connection is closed."""
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(CLIENT_CHECK_S)


async def _done_or_gone(request: web.Request, generation: Generation) -> DoneEvent:
    """The generation's `done` event; ConnectionResetError if the client leaves."""
    done = asyncio.ensure_future(wait_until_done(request.app, generation.id))
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (done, gone):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if done.done() and not done.cancelled():
        return done.result()
    raise ConnectionResetError("the client closed the connection")


async def wait_for_generation(
    request: web.Request, generation: Generation, timeout_s: float
) -> None:
    """Until the generation ends well; otherwise the matching error: 410
    cancelled, 502 failed, 504 not done within `timeout_s` (then cancelled).
    A client that hangs up has it cancelled too (answered as gone, 499)."""
    app = request.app
    try:
        async with asyncio.timeout(timeout_s):
            event = await _done_or_gone(request, generation)
        status = Status(event.status)
        error = event.error.message if event.error else None
    except TimeoutError:
        if await cancel_generation(app, generation):
            raise GatewayTimeout(
                "The images were not ready in time; the request was cancelled."
            ) from None
        # It finished between the timeout and the cancel: answer as it ended.
        await generation.refresh_from_db(fields=["status", "error_message"])
        status, error = Status(generation.status), generation.error_message
    except (ConnectionResetError, asyncio.CancelledError):
        # Shielded: a cancelled handler's own task is being cancelled.
        await asyncio.shield(cancel_generation(app, generation))
        raise
    if status is Status.CANCELLED:
        raise Gone("The generation was cancelled before it finished.")
    if status is Status.FAILED:
        raise GenerationFailed(f"The generation failed: {error or 'unknown reason'}")

"""A1111's `progress` for one running generation.

Its step and the time left are what `Generation.eta_s` shows (web/eta.py:
this job's measured step rate blended with the speed its nodes learned);
only the running part, as A1111's `eta_relative` means: time in the queue
or loading the model is never folded in. The latest step preview comes from
its event stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from sdapi.contract.events import ProgressEvent, StartedEvent
from sdapi.db.models import Generation
from sdapi.infra.deadline import Deadline
from sdapi.infra.streams import latest_events
from web.appkeys import redis_key
from web.eta import live_state

# Events read back from the newest to find a preview (nodes send one every
# few steps), few enough for a poll every half second.
WINDOW = 64
PREVIEW_PREFIX = "base64,"


@dataclass(frozen=True)
class Running:
    """How far a running generation is, and how long it should still take."""

    step: int
    total: int
    eta_s: float
    preview: str | None


async def _latest_preview(
    app: web.Application, generation: Generation, deadline: Deadline
) -> str | None:
    events = await deadline.run(
        latest_events(app[redis_key], str(generation.id), count=WINDOW)
    )
    for _, event in events:
        if isinstance(event, StartedEvent):
            break  # nothing before it is this run's
        if isinstance(event, ProgressEvent) and event.preview:
            return event.preview.partition(PREVIEW_PREFIX)[2] or None
    return None


async def running_progress(
    app: web.Application, generation: Generation, deadline: Deadline
) -> Running:
    """The latest step, the running time left, the latest preview."""
    live = await live_state(app, generation, deadline)
    progress = live.progress
    return Running(
        step=0 if progress is None else progress.step,
        total=0 if progress is None else progress.total,
        eta_s=0.0 if live.eta is None else round(live.eta.run_s, 1),
        preview=await _latest_preview(app, generation, deadline),
    )

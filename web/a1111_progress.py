"""A1111's `progress` for one running generation, from its own progress events.

The time left is the steps left at the step rate measured between its
latest progress events (the entry ids of its Redis stream carry Redis's
clock, so no two clocks are compared): time in the queue or loading the
model is never folded in.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from sdapi.contract.events import ProgressEvent, StartedEvent
from sdapi.infra.streams import latest_events

# Events read back from the newest: enough for a few previews and a rate
# measured over many steps, little enough for a poll every half second.
WINDOW = 64
PREVIEW_PREFIX = "base64,"


@dataclass(frozen=True)
class Running:
    """How far a running generation is, and how long it should still take."""

    step: int
    total: int
    eta_s: float
    preview: str | None


def _ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


async def running_progress(redis: Redis, generation_id: str) -> Running:
    """The latest step, the time left at the measured rate, the latest preview."""
    events = await latest_events(redis, generation_id, count=WINDOW)
    points: list[tuple[int, int]] = []  # (ms, step), newest first
    total = 0
    preview: str | None = None
    for entry_id, event in events:
        if isinstance(event, ProgressEvent):
            points.append((_ms(entry_id), event.step))
            total = total or event.total
            if preview is None and event.preview:
                preview = event.preview.partition(PREVIEW_PREFIX)[2] or None
        elif isinstance(event, StartedEvent):
            # Steps count from here: a rate from one progress event.
            points.append((_ms(entry_id), 0))
            break
    if not points or total == 0:
        return Running(step=0, total=total, eta_s=0.0, preview=preview)
    (last_ms, step), (first_ms, first_step) = points[0], points[-1]
    eta_s = 0.0
    if step > first_step and last_ms > first_ms:
        per_step_s = (last_ms - first_ms) / 1000 / (step - first_step)
        seconds, micros = await redis.time()
        since_last_s = max(0.0, seconds + micros / 1e6 - last_ms / 1000)
        eta_s = max(0.0, (total - step) * per_step_s - since_last_s)
    return Running(step=step, total=total, eta_s=eta_s, preview=preview)

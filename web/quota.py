"""How much of their daily quota and in-flight allowance a user is using.

`usage` is what `/me` shows and what quota enforcement checks; call it inside
the transaction that locked the user row when the answer decides an insert.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from tortoise.functions import Sum

from gpu_node.schemas import Status, Tier
from web.models import Generation, User

# Failed and cancelled requests give their images back to the day's quota.
NOT_COUNTED_TODAY = (Status.FAILED, Status.CANCELLED)
IN_FLIGHT = (Status.QUEUED, Status.RUNNING)


@dataclass(frozen=True)
class Usage:
    """A user's use of their limits at one moment."""

    # Images of today's (UTC) requests that did not fail or get cancelled.
    images_today: int
    # Premium requests queued or running now.
    in_flight: int


def start_of_day(now: datetime) -> datetime:
    """00:00 UTC of `now`'s UTC day."""
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def usage(user: User, now: datetime) -> Usage:
    """The user's images today (UTC) and premium generations in flight at `now`."""
    totals = (
        await Generation.filter(user_id=user.id, created_at__gte=start_of_day(now))
        .exclude(status__in=NOT_COUNTED_TODAY)
        .annotate(total=Sum("num_images"))
        .values_list("total", flat=True)
    )
    in_flight = await Generation.filter(
        user_id=user.id, tier=Tier.PREMIUM, status__in=IN_FLIGHT
    ).count()
    total = totals[0] if totals else None
    images_today = int(total) if isinstance(total, int) else 0
    return Usage(images_today=images_today, in_flight=in_flight)

"""How much of their daily quota and in-flight allowance a user is using.

`usage` is what `/me` shows and what quota enforcement checks; call it inside
the transaction that locked the user row when the answer decides an insert.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from tortoise.expressions import Q
from tortoise.functions import Count, Sum

from sdapi.contract.status import Status, Tier
from sdapi.db.models import Generation, User

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
    # One query: this runs inside the transaction that holds the user's lock.
    rows = (
        await Generation.filter(user_id=user.id)
        .annotate(
            images=Sum(
                "num_images",
                _filter=Q(created_at__gte=start_of_day(now))
                & ~Q(status__in=NOT_COUNTED_TODAY),
            ),
            flying=Count("id", _filter=Q(tier=Tier.PREMIUM, status__in=IN_FLIGHT)),
        )
        .values("images", "flying")
    )
    row = rows[0] if rows else {}
    images, flying = row.get("images"), row.get("flying")
    return Usage(
        images_today=int(images) if isinstance(images, int) else 0,
        in_flight=int(flying) if isinstance(flying, int) else 0,
    )

"""How much of their daily quota and in-flight allowance a user is using.

`usage` is what `/me` shows and what quota enforcement checks; call it inside
the transaction that locked the user row when the answer decides an insert.
`insert_within_limits` is the same count and the insert in one statement.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tortoise.backends.base.client import BaseDBAsyncClient

from sdapi.contract.status import Status, Tier
from sdapi.db.connection import insert_columns, model_connection, table_name
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


def _used_sql(table: str) -> str:
    """What a user uses, as SQL: one definition for `usage` and the insert.
    Parameters: $1 the user, $2 the day's start, $3 statuses not counted
    today, $4 the premium tier, $5 statuses in flight."""
    return f"""
        SELECT
            COALESCE(SUM(num_images) FILTER (
                WHERE created_at >= $2 AND NOT status = ANY($3::text[])
            ), 0) AS images,
            COUNT(*) FILTER (
                WHERE tier = $4 AND status = ANY($5::text[])
            ) AS flying
        FROM "{table}"
        -- Only rows one of the counts can take: not the user's history.
        WHERE user_id = $1 AND (created_at >= $2 OR status = ANY($5::text[]))
    """  # noqa: S608 (the table name is our model's; every value is a parameter)


def _used_values(user_id: object, now: datetime) -> list[object]:
    return [
        user_id,
        start_of_day(now),
        [status.value for status in NOT_COUNTED_TODAY],
        Tier.PREMIUM.value,
        [status.value for status in IN_FLIGHT],
    ]


def _usage_of(row: dict[str, Any]) -> Usage:
    return Usage(images_today=int(row["images"]), in_flight=int(row["flying"]))


async def usage(user: User, now: datetime) -> Usage:
    """The user's images today (UTC) and premium generations in flight at `now`."""
    # One query: this runs inside the transaction that holds the user's lock.
    rows = await model_connection(Generation).execute_query_dict(
        _used_sql(table_name(Generation)), _used_values(user.id, now)
    )
    return _usage_of(rows[0])


async def insert_within_limits(
    connection: BaseDBAsyncClient,
    generation: Generation,
    *,
    now: datetime,
    images_per_day: int,
    max_in_flight: int | None,
) -> tuple[bool, Usage]:
    """Insert the unsaved `generation` if its user's limits allow it; whether
    it was, and the usage before it (what a refusal reports).

    One round trip for what `usage` and `Generation.create` do in two. Run it
    in the transaction that already locked the user's row, in a statement of
    its own: READ COMMITTED gives each statement a snapshot taken when it
    starts, so this one, started after the lock, counts every request
    committed before it. (One statement that locked and counted would count
    from a snapshot taken before it waited for the lock.)
    """
    columns = insert_columns(generation)
    values = [
        *_used_values(generation.user_id, now),
        generation.num_images,
        images_per_day,
        max_in_flight,
    ]
    first = len(values) + 1
    names = ", ".join(f'"{column}"' for column, _, _ in columns)
    casts = ", ".join(
        f"${first + n}::{sql_type}" for n, (_, sql_type, _) in enumerate(columns)
    )
    values += [value for _, _, value in columns]
    table = table_name(Generation)
    query = f"""
        WITH used AS ({_used_sql(table)}
        ), added AS (
            INSERT INTO "{table}" ({names})
            SELECT {casts} FROM used
            WHERE used.images + $6::int <= $7::int
              AND ($8::int IS NULL OR used.flying < $8::int)
            RETURNING 1
        )
        SELECT images, flying, (SELECT COUNT(*) FROM added) AS added FROM used
    """  # noqa: S608 (names come from our models; every value is a parameter)
    _, rows = await connection.execute_query(query, values)
    row = rows[0]
    return bool(row["added"]), _usage_of(row)

"""The one wall clock the processes stamp times with."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC (what the database stores)."""
    return datetime.now(UTC)

"""The life of a generation, and the service tiers."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """The life of a generation; a terminal status never changes again."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})
ACTIVE_STATUSES = frozenset({Status.SCHEDULED, Status.QUEUED, Status.RUNNING})


class Tier(StrEnum):
    NORMAL = "normal"
    PREMIUM = "premium"

"""Models of the operational endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from sdapi.infra.registry import ModelOffer


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unready"]
    database: bool
    redis: bool
    consul: bool | None = Field(
        default=None,
        # Left out without Consul: the body stays as it was.
        exclude_if=lambda answers: answers is None,
        description="Whether the Consul agent answers the GPU node watch (null "
        "without Consul). While it does not, the nodes last seen stay in use "
        "and the replica stays ready.",
    )


class ModelList(BaseModel):
    """Models healthy GPU nodes serve (and configured ones waiting for a node)."""

    items: list[ModelOffer]

"""Models of the operational endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from web.registry import ModelOffer


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "unready"]
    database: bool
    redis: bool


class ModelList(BaseModel):
    """Models healthy GPU nodes serve (and configured ones waiting for a node)."""

    items: list[ModelOffer]

"""Models of `GET /api/v1/status`: queue depths per tier and model, GPU nodes."""

from __future__ import annotations

from pydantic import BaseModel, Field


class StatusCounts(BaseModel):
    """Unfinished generations by status (from the database)."""

    scheduled: int = 0
    queued: int = 0
    running: int = 0


class TierQueue(BaseModel):
    """One tier's work for one model."""

    jobs: int = Field(
        description="Jobs on the model's queue for this tier, waiting or running "
        "(a normal-tier job is a batch of generations)"
    )
    generations: StatusCounts


class ModelStatus(BaseModel):
    """A model's healthy nodes and the work waiting for them."""

    model: str
    available: bool = Field(description="A healthy GPU node serves it")
    nodes: int = Field(description="Healthy GPU nodes serving it")
    max_batch: int = Field(description="Images per batch its nodes accept")
    premium: TierQueue
    normal: TierQueue


class ServiceStatus(BaseModel):
    """Queue depths per tier and model, and the healthy GPU nodes."""

    models: list[ModelStatus]
    healthy_nodes: int
    scheduled: int = Field(description="Normal-tier requests waiting for their time")
    scheduled_due: int = Field(
        description="Scheduled requests whose time has come, waiting for a GPU"
    )

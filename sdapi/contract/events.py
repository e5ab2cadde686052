"""Events of a generation, as its Redis stream and the WebSocket carry them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from sdapi.contract.payloads import ErrorInfo
from sdapi.contract.status import Status


class _Event(BaseModel):
    # Unknown fields ignored, as in the payloads (`sdapi.contract.payloads`): a
    # relay must not choke on an event from a newer node.
    model_config = ConfigDict(extra="ignore", frozen=True)


class QueuedEvent(_Event):
    type: Literal["queued"] = "queued"
    position: int = Field(ge=0)
    # No healthy node serves the model yet: it runs when one comes up.
    waiting_for_node: bool = False
    # Estimated seconds until it starts, and then until it ends; None while
    # they cannot be known (`sdapi.infra.eta`).
    wait_s: float | None = None
    run_s: float | None = None


class LoadingModelEvent(_Event):
    """The job waits for its model to load on the node that took it."""

    type: Literal["loading_model"] = "loading_model"
    model: str


class StartedEvent(_Event):
    type: Literal["started"] = "started"
    node_id: str = ""
    # Seconds the job waited for its model to load; None when it was loaded.
    load_s: float | None = None
    # Seconds the node expects the job to run, from its own learned speed;
    # None before it ran the model.
    eta_s: float | None = None


class ProgressEvent(_Event):
    type: Literal["progress"] = "progress"
    step: int
    total: int
    # A small JPEG as a data: URL, every few steps; None in between.
    preview: str | None = None


class ImageEvent(_Event):
    type: Literal["image"] = "image"
    index: int
    seed: int
    width: int
    height: int
    sha256: str


class DoneEvent(_Event):
    type: Literal["done"] = "done"
    status: Literal[Status.SUCCEEDED, Status.FAILED, Status.CANCELLED]
    error: ErrorInfo | None = None


Event = Annotated[
    QueuedEvent
    | LoadingModelEvent
    | StartedEvent
    | ProgressEvent
    | ImageEvent
    | DoneEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_FIELD = "e"  # the stream entry's field holding the event's JSON

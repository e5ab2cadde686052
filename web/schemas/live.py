"""Messages of the live WebSocket (`GET /api/v1/ws`), both directions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter

from sdapi.contract.status import Status
from web.schemas.base import RequestModel
from web.schemas.generations import (
    ETA_DESCRIPTION,
    ErrorRef,
    EtaParts,
    GenerationRequest,
    GenerationView,
)

# --- client -> server -------------------------------------------------------


class GenerateMessage(RequestModel):
    """Ask for images (premium only); answered by `accepted`, then its events."""

    type: Literal["generate"]
    request: GenerationRequest


class SubscribeMessage(RequestModel):
    """Follow one of your generations; what it already emitted is replayed first."""

    type: Literal["subscribe"]
    id: str = Field(max_length=100)


class CancelMessage(RequestModel):
    """Cancel one of your generations unless it has finished."""

    type: Literal["cancel"]
    id: str = Field(max_length=100)


ClientMessage = Annotated[
    GenerateMessage | SubscribeMessage | CancelMessage, Field(discriminator="type")
]
CLIENT_MESSAGE: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
MESSAGE_TYPES = ("generate", "subscribe", "cancel")


# --- server -> client -------------------------------------------------------


class AcceptedFrame(BaseModel):
    type: Literal["accepted"] = "accepted"
    id: str
    generation: GenerationView


class QueuedFrame(BaseModel):
    type: Literal["queued"] = "queued"
    id: str
    position: int
    waiting_for_node: bool = Field(
        default=False,
        # Sent only when true: the frame stays as it was for older clients.
        exclude_if=lambda waiting: not waiting,
        description="Sent (true) while no healthy GPU node serves the model; the "
        "request waits in the queue and runs when one comes up.",
    )
    eta_s: float | None = Field(default=None, description=ETA_DESCRIPTION)
    eta: EtaParts | None = Field(
        default=None, description="`eta_s` in its parts; null with it"
    )


class LoadingModelFrame(BaseModel):
    type: Literal["loading_model"] = "loading_model"
    id: str
    model: str = Field(description="The model the node loads for the generation")


class StartedFrame(BaseModel):
    type: Literal["started"] = "started"
    id: str
    load_s: float | None = Field(
        default=None,
        description="Seconds the generation waited for its model to load; null "
        "when the model was loaded already",
    )
    eta_s: float | None = Field(
        default=None,
        description="Seconds the node expects it to run, from the speed it "
        "measured on its earlier runs of the model; null before it ran it",
    )


class ProgressFrame(BaseModel):
    type: Literal["progress"] = "progress"
    id: str
    step: int
    total: int
    preview: str | None = Field(
        description="A small JPEG as a data: URL every few steps; null in between"
    )


class ImageFrame(BaseModel):
    type: Literal["image"] = "image"
    id: str
    index: int
    seed: int
    url: str
    data: str = Field(description="The PNG, base64")


class DoneFrame(BaseModel):
    type: Literal["done"] = "done"
    id: str
    status: Literal[Status.SUCCEEDED, Status.FAILED, Status.CANCELLED]
    # Only when the generation failed.
    error: ErrorRef | None = Field(default=None, exclude_if=lambda value: value is None)


class FieldProblem(BaseModel):
    field: str
    message: str


class ErrorFrame(BaseModel):
    type: Literal["error"] = "error"
    id: str | None
    code: str
    message: str
    # One entry per bad field of a `validation_error`, as in HTTP answers.
    details: list[FieldProblem] = []


ServerFrame = (
    AcceptedFrame
    | QueuedFrame
    | LoadingModelFrame
    | StartedFrame
    | ProgressFrame
    | ImageFrame
    | DoneFrame
    | ErrorFrame
)

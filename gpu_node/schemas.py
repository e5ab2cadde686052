"""The GPU node's contract: queue and key names, job payloads, results, events.

Producers (`web`, `jobs`) and the node import this module; it imports only
pydantic and the standard library, never torch, so a web replica can use it.
Everything that crosses Redis is one of these models, dumped with
``model_dump(mode="json")`` and validated again on the other side.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

SEED_MAX = 2**32 - 1

# How long per-generation Redis state (events, PNGs, cancel flags) outlives the
# last write, in seconds: long enough for a late subscriber or a slow `jobs`
# worker, short enough that Redis does not become an image store.
EVENT_TTL_S = 6 * 3600
IMAGE_TTL_S = 24 * 3600
CANCEL_TTL_S = 24 * 3600
# A node's announcement in Redis expires unless refreshed (seconds).
NODE_TTL_S = 15
# Most entries kept in one generation's event stream (progress is every step).
EVENT_STREAM_MAXLEN = 2000


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


# --- queue, function and key names -----------------------------------------

QUEUE_PREFIX = "sdapi:gpu"
RESULTS_QUEUE = "sdapi:jobs"  # the `jobs` worker's arq queue

GENERATE_FUNCTION = "generate"  # one premium generation
BATCH_FUNCTION = "generate_batch"  # several normal generations, one pipeline call
STORE_RESULT_FUNCTION = "store_result"  # jobs: persist a finished generation
MARK_STARTED_FUNCTION = "mark_started"  # jobs: record that a node began work


def premium_queue(model: str) -> str:
    """The arq queue a node serving `model` drains first."""
    return f"{QUEUE_PREFIX}:{model}:premium"


def batch_queue(model: str) -> str:
    """The arq queue of normal-tier batches for `model`."""
    return f"{QUEUE_PREFIX}:{model}:batch"


def wake_channel(queue: str) -> str:
    """Pub/sub channel told of new work on `queue`, so nodes need not wait a poll."""
    return f"{queue}:wake"


# Pub/sub channel carrying the ids of cancelled generations (the flag at
# `cancel_key` stays the truth; the message only saves a node from polling it).
CANCEL_CHANNEL = "sdapi:cancels"


def events_key(generation_id: UUID | str) -> str:
    """Redis stream of a generation's events, replayed to late subscribers."""
    return f"sdapi:events:{generation_id}"


def done_key(generation_id: UUID | str) -> str:
    """Set (NX) by whoever appends the single `done` event of a generation."""
    return f"sdapi:done:{generation_id}"


def cancel_key(generation_id: UUID | str) -> str:
    """Present while a generation is cancelled; the node checks it every step."""
    return f"sdapi:cancel:{generation_id}"


def image_key(generation_id: UUID | str, index: int) -> str:
    """PNG bytes of one image, from the node until `jobs` has stored them."""
    return f"sdapi:image:{generation_id}:{index}"


def progress_key(generation_id: UUID | str) -> str:
    """Hash with the latest `step` and `total` of a running generation."""
    return f"sdapi:progress:{generation_id}"


def node_key(node_id: str) -> str:
    """A node's `NodeInfo`, refreshed while it lives (used without Consul)."""
    return f"sdapi:node:{node_id}"


def generation_job_id(generation_id: UUID | str, attempt: int = 1) -> str:
    """arq job id of a premium generation; a re-enqueue gets a new one."""
    return str(generation_id) if attempt <= 1 else f"{generation_id}:{attempt}"


def batch_job_id(batch_id: UUID | str, attempt: int = 1) -> str:
    """arq job id of a normal-tier batch."""
    return f"batch:{batch_id}" if attempt <= 1 else f"batch:{batch_id}:{attempt}"


def result_job_id(generation_id: UUID | str, attempt: int = 1) -> str:
    """arq job id of the `store_result` job of one attempt of a generation."""
    return f"result:{generation_id}:{attempt}"


def started_job_id(generation_id: UUID | str, attempt: int = 1) -> str:
    """arq job id of the `mark_started` job of one attempt of a generation."""
    return f"started:{generation_id}:{attempt}"


# --- job payloads ----------------------------------------------------------

# Unknown fields are ignored, not refused: during a rolling deploy a producer
# that already sends a new field must not make an older consumer fail its jobs
# (or drop its events) for good. Fields are only ever added with defaults.
_CONTRACT = ConfigDict(extra="ignore", frozen=True)

# Upper bounds a node enforces whatever a producer sends (web's own limits
# are lower): a payload in Redis is not trusted to be sane.
STEPS_MAX = 500
IMAGES_MAX = 64
PROMPT_MAX_CHARS = 10_000
SIZE_MAX = 4096


class GenerationParams(BaseModel):
    """What the pipeline needs for one generation, already validated by `web`."""

    model_config = _CONTRACT

    prompt: str = Field(max_length=PROMPT_MAX_CHARS)
    negative_prompt: str = Field(default="", max_length=PROMPT_MAX_CHARS)
    width: int = Field(ge=8, le=SIZE_MAX, multiple_of=8)
    height: int = Field(ge=8, le=SIZE_MAX, multiple_of=8)
    steps: int = Field(ge=1, le=STEPS_MAX)
    guidance_scale: float = Field(ge=0, allow_inf_nan=False)
    seed: int = Field(ge=0, le=SEED_MAX)
    num_images: int = Field(ge=1, le=IMAGES_MAX)
    scheduler: str

    def image_seeds(self) -> list[int]:
        """Image i uses seed + i (wrapping), as AUTOMATIC1111 does."""
        return [(self.seed + i) % (SEED_MAX + 1) for i in range(self.num_images)]

    def batch_key(self) -> tuple[int, int, int, float, str]:
        """Generations with equal keys can share one pipeline call."""
        return (
            self.width,
            self.height,
            self.steps,
            self.guidance_scale,
            self.scheduler,
        )


class GenerationJob(BaseModel):
    """Payload of `generate`: one generation, and one item of a batch."""

    model_config = _CONTRACT

    generation_id: UUID
    model: str
    tier: Tier
    params: GenerationParams
    attempt: int = Field(default=1, ge=1)


class BatchJob(BaseModel):
    """Payload of `generate_batch`: compatible generations run in one call."""

    model_config = _CONTRACT

    batch_id: UUID
    model: str
    items: list[GenerationJob] = Field(min_length=1, max_length=IMAGES_MAX)
    attempt: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _compatible(self) -> BatchJob:
        keys = {item.params.batch_key() for item in self.items}
        if len(keys) != 1:
            raise ValueError("batch items differ in size, steps, guidance or scheduler")
        if any(item.model != self.model for item in self.items):
            raise ValueError("batch items must all use the batch's model")
        return self

    @property
    def image_count(self) -> int:
        return sum(item.params.num_images for item in self.items)


JOB_TIMEOUT_MAX_S = 6 * 3600


def job_timeout_s(
    params: GenerationParams,
    images: int,
    *,
    base_s: float = 60.0,
    seconds_per_image_step: float = 2.0,
) -> float:
    """A generous time limit for `images` images of `params`, in seconds.

    `seconds_per_image_step` is the slowest plausible speed at 512x512 (an
    SD-1.5 step on a CPU is ~4 s; on any GPU well under 0.1 s); size scales it.
    """
    pixels = params.width * params.height / (512 * 512)
    estimate = params.steps * images * seconds_per_image_step * max(pixels, 0.25)
    return min(JOB_TIMEOUT_MAX_S, base_s + estimate)


# --- results (node -> jobs) ------------------------------------------------


class ErrorInfo(BaseModel):
    """Why a generation failed, as the user sees it."""

    model_config = _CONTRACT

    code: str
    message: str


class ImageInfo(BaseModel):
    """One image a node made; its PNG waits under `image_key`."""

    model_config = _CONTRACT

    index: int = Field(ge=0)
    seed: int = Field(ge=0, le=SEED_MAX)
    width: int
    height: int
    sha256: str
    size_bytes: int


class StartedNotice(BaseModel):
    """Payload of `mark_started`."""

    model_config = _CONTRACT

    generation_id: UUID
    attempt: int = 1
    node_id: str
    started_at: datetime


class GenerationResult(BaseModel):
    """Payload of `store_result`: how one attempt of a generation ended."""

    model_config = _CONTRACT

    generation_id: UUID
    attempt: int = 1
    status: Literal[Status.SUCCEEDED, Status.FAILED, Status.CANCELLED]
    images: list[ImageInfo] = []
    error: ErrorInfo | None = None
    node_id: str
    model: str
    model_hash: str = ""
    started_at: datetime | None = None
    finished_at: datetime
    # Tokens beyond the text encoder's window, reported rather than silently cut.
    prompt_tokens_dropped: int = 0
    negative_prompt_tokens_dropped: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> GenerationResult:
        if self.status is Status.SUCCEEDED and not self.images:
            raise ValueError("a succeeded result carries its images")
        if self.status is Status.FAILED and self.error is None:
            raise ValueError("a failed result says why")
        return self


# --- events (a Redis stream per generation) --------------------------------


class _Event(BaseModel):
    # Ignored, not refused, for the same reason as `_CONTRACT`: a relay must
    # not choke on an event from a newer node.
    model_config = ConfigDict(extra="ignore", frozen=True)


class QueuedEvent(_Event):
    type: Literal["queued"] = "queued"
    position: int = Field(ge=0)


class StartedEvent(_Event):
    type: Literal["started"] = "started"
    node_id: str = ""


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
    QueuedEvent | StartedEvent | ProgressEvent | ImageEvent | DoneEvent,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_FIELD = "e"  # the stream entry's field holding the event's JSON


# --- node announcement (Consul Meta or Redis) ------------------------------


class NodeInfo(BaseModel):
    """What a node serves and how; Consul Meta values are all strings."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    node_id: str
    model: str
    model_hash: str = ""
    pipeline: str = "sd"
    device: str
    memory_bytes: int = 0
    max_batch: int = Field(ge=1)
    default_steps: int
    default_guidance: float
    default_scheduler: str
    default_width: int
    default_height: int
    max_width: int
    max_height: int
    schedulers: list[str]
    health_url: str = ""

    def to_meta(self) -> dict[str, str]:
        """Flatten to Consul service Meta (string values, keys <= 128 chars)."""
        meta: dict[str, str] = {}
        for key, value in self.model_dump(mode="json").items():
            meta[key] = ",".join(value) if isinstance(value, list) else str(value)
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> NodeInfo:
        """Inverse of `to_meta`."""
        data = dict(meta)
        schedulers = data.get("schedulers", "")
        data["schedulers"] = [s for s in str(schedulers).split(",") if s]
        return cls.model_validate(data)

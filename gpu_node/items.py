"""One generation of a job, checked and ready for the pipeline, and its outcome."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from gpu_node.calls import LoraUse
from sdapi.contract.payloads import ErrorInfo, GenerationJob
from sdapi.contract.status import Status

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass
class PreparedItem:
    """A generation on its way through the node: prepared, run, delivered."""

    job: GenerationJob
    prompt: str
    negative_prompt: str
    # Text encoder windows of its longer prompt: only items of equal length
    # share a pipeline call (padding would change their images).
    windows: int = 1
    started_at: datetime | None = None
    images: list[Image] = field(default_factory=list)
    # Inputs fetched by hash and sized for the call (img2img / inpainting).
    init_image: Image | None = None
    mask: Image | None = None
    # Its LoRAs, found in the node's folder.
    loras: tuple[LoraUse, ...] = ()
    # None while it still runs; then how it ended.
    status: Status | None = None
    error: ErrorInfo | None = None

    @property
    def key(self) -> str:
        return str(self.job.generation_id)

    def fail(self, code: str, message: str) -> None:
        self.status = Status.FAILED
        self.error = ErrorInfo(code=code, message=message)

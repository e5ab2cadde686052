"""What the node asks of the pipeline, torch-free: calls, observers, profiles.

`gpu_node.pipeline` (the engine; with `gpu_node.tiny`, the only modules that
import torch) implements `Engine`; everything else talks to it through these
types, so queue handling, progress and announcements import and test without
torch.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from sdapi.contract.nodes import ModelLimits
from sdapi.contract.payloads import Mode

if TYPE_CHECKING:
    from PIL.Image import Image


# Scheduler names clients use, with the sampler names AUTOMATIC1111 writes in
# its `parameters` PNG chunk (so other tools read our PNGs).
SAMPLER_LABELS: Mapping[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "unipc": "UniPC",
    "lms": "LMS",
    "pndm": "PLMS",
}


class OutOfMemory(Exception):
    """The device ran out of memory; a smaller call may fit."""


class CallStopped(Exception):
    """Raised at a step boundary to end a pipeline call early."""


class LoraError(Exception):
    """A LoRA cannot be read or applied to the model; one line naming it."""


class ModelError(Exception):
    """The model cannot be found, fetched or loaded; one line naming it."""


@dataclass(frozen=True)
class CallItem:
    """One generation's share of a pipeline call: its prompts, seeds and inputs."""

    key: str
    prompt: str
    negative_prompt: str
    seeds: tuple[int, ...]
    # img2img / inpainting inputs, already at the call's size (mask: mode "L",
    # white = repaint).
    init_image: Image | None = None
    mask: Image | None = None


@dataclass(frozen=True)
class LoraUse:
    """A LoRA file applied to a whole call at `weight`."""

    name: str
    weight: float
    path: Path
    # Of its tensors: the engine keeps adapters by it, so a replaced file
    # under the same name is loaded afresh.
    sha256: str


@dataclass(frozen=True)
class PipelineCall:
    """Images that share size, steps, guidance and scheduler: one pipeline call."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    items: tuple[CallItem, ...]
    mode: Mode = Mode.TXT2IMG
    # Share of `steps` run from the init image (1 for txt2img).
    strength: float = 1.0
    # How prompts are read: "a1111" (emphasis and BREAK) or "plain".
    prompt_syntax: str = "a1111"
    loras: tuple[LoraUse, ...] = ()

    @property
    def image_count(self) -> int:
        return sum(len(item.seeds) for item in self.items)

    def split(self, max_images: int) -> list[PipelineCall]:
        """Calls of at most `max_images` images, same order, items cut if needed."""
        rows = [(item, seed) for item in self.items for seed in item.seeds]
        calls: list[PipelineCall] = []
        for start in range(0, len(rows), max(1, max_images)):
            chunk = rows[start : start + max(1, max_images)]
            items: list[CallItem] = []
            for item, seed in chunk:
                if items and items[-1].key == item.key:
                    items[-1] = replace(items[-1], seeds=(*items[-1].seeds, seed))
                else:
                    items.append(replace(item, seeds=(seed,)))
            calls.append(replace(self, items=tuple(items)))
        return calls

    def only(self, keys: Collection[str]) -> PipelineCall:
        """The same call for the items in `keys` only."""
        return replace(self, items=tuple(i for i in self.items if i.key in keys))


class StepObserver(Protocol):
    """Told about every denoising step, on the pipeline thread."""

    def before_start(self) -> None:
        """Called once before the call starts; may raise `CallStopped`."""

    def on_step(
        self, step: int, total: int, preview: Callable[[str], bytes | None]
    ) -> None:
        """Step `step` (1-based) of the call's `total` is done; may raise `CallStopped`.

        `preview(key)` renders a small JPEG of item `key`'s latents now.
        """

    def between_images(self) -> None:
        """The VAE is about to decode one of the call's images (one at a time)."""


class QuietObserver:
    """Watches nothing: a call run for its images alone (references,
    benchmarks, warm-ups), never stopped and never previewed."""

    def before_start(self) -> None:
        return None

    def on_step(
        self, step: int, total: int, preview: Callable[[str], bytes | None]
    ) -> None:
        return None

    def between_images(self) -> None:
        return None


@dataclass(frozen=True)
class ModelProfile:
    """What a loaded model is, and the defaults and limits it is served with."""

    model: str
    model_hash: str
    pipeline: str
    device: str
    memory_bytes: int
    # Its defaults and limits; `max_batch` is the device's default images
    # per call (SDAPI_GPU_MAX_BATCH overrides it).
    limits: ModelLimits
    token_window: int
    versions: Mapping[str, str] = field(default_factory=dict)
    # The base kind its LoRAs must be for (gpu_node.loras.base_kind).
    lora_kind: str = ""


# Components a node's models may share when their weights are identical. Not
# the text encoders: LoRA adapters are injected into them, and one model's
# active adapters would change another's images.
SHAREABLE_COMPONENTS = ("vae",)


@dataclass(frozen=True)
class SharedComponents:
    """Modules loaded once for every model of a node whose weights match.

    `keys` names each shareable component of the model being loaded by the
    hash of its weights; `modules` (the residency's, weakly held: a module
    goes once no engine holds it) maps such keys, with the engine's dtype, to
    a module already on the device.
    """

    keys: Mapping[str, str]
    modules: MutableMapping[str, Any]


class Engine(Protocol):
    """A loaded pipeline that runs one call at a time on one device."""

    @property
    def profile(self) -> ModelProfile:
        """The model and its defaults."""

    def run(self, call: PipelineCall, observer: StepObserver) -> dict[str, list[Image]]:
        """Run `call` (on the calling thread) and return each item's images."""

    def prompt_windows(self, text: str, syntax: str) -> int:
        """Text encoder windows `text` takes, read with `syntax` (any thread)."""

    def memory_stats(self) -> dict[str, int]:
        """Device memory in bytes (allocated, reserved, peak, total); {} on CPU."""

    def to_host(self, keep: Collection[str] = ()) -> None:
        """Move the weights, except the components in `keep` (shared with a
        model on the device), to host RAM (blocking: on the GPU thread)."""

    def to_device(self) -> None:
        """Move the weights back to the device (blocking: on the GPU thread)."""

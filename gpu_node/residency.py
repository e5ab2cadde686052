"""Which of a node's models are in device memory: loaded on demand, LRU out.

A node serves a catalogue (SDAPI_MODELS). As many models stay loaded as their
weights fit in the memory budget (SDAPI_GPU_MEMORY_FRACTION of the device, or
SDAPI_GPU_RAM_BUDGET_BYTES on CPU); loading one more unloads the least
recently used models that are not running a call. The model in use is never
unloaded, so one model is always served whatever the budget. Loads run on the
GPU thread, one at a time, between pipeline calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from gpu_node import checkpoints, weights
from gpu_node.calls import Engine, ModelError, ModelProfile
from gpu_node.executor import GpuExecutor
from gpu_node.health import NodeMetrics
from gpu_node.settings import GpuNodeSettings
from gpu_node.weights import ModelLocation
from sdapi.contract.catalogue import CatalogueEntry
from sdapi.contract.nodes import GENERIC_LIMITS, ModelLimits

log = logging.getLogger(__name__)

# Loads a prepared model (blocking; called on the GPU thread).
Loader = Callable[[ModelLocation], Engine]


def folder_kind(folder: Path) -> str:
    """sd1, sd2 or sdxl (`-inpaint` for 9 input channels) of a diffusers folder."""
    with contextlib.suppress(OSError, ValueError):
        index = json.loads((folder / "model_index.json").read_text())
        unet = json.loads((folder / "unet" / "config.json").read_text())
        if "XL" in str(index.get("_class_name", "")):
            family = "sdxl"
        elif unet.get("cross_attention_dim") == 1024:
            family = "sd2"
        else:
            family = "sd1"
        inpaint = unet.get("in_channels") == 9
        return f"{family}-inpaint" if inpaint else family
    return ""


def weights_bytes(path: Path) -> int:
    """Bytes of a model's safetensors weights: what loading it takes, roughly."""
    if path.is_file():
        return path.stat().st_size
    return sum(
        p.stat().st_size
        for p in path.glob("**/*.safetensors")
        if not any(part in weights.SKIPPED_COMPONENTS for part in p.parts)
    )


@dataclass
class ModelSlot:
    """One model of the catalogue, loaded or not."""

    location: ModelLocation
    kind: str = ""
    footprint: int = 0
    engine: Engine | None = None
    # Kept once loaded: the limits stay known while it is unloaded.
    profile: ModelProfile | None = None
    last_used: float = 0.0
    in_use: int = 0

    @property
    def name(self) -> str:
        return self.location.model_id


def locate(settings: GpuNodeSettings) -> list[ModelLocation]:
    """Where each catalogue entry's weights are; nothing fetched yet."""
    found: list[ModelLocation] = []
    for entry in settings.catalogue:
        location = weights.locate_model(entry.spec, settings.models_path, entry.name)
        if any(other.model_id == location.model_id for other in found):
            raise ModelError(
                f"SDAPI_MODELS names {location.model_id!r} twice; "
                "give one of them another name (name=spec)"
            )
        found.append(location)
    return found


def describe(entry: CatalogueEntry) -> str:
    return f"{entry.name}={entry.spec}" if entry.name else entry.spec


class ModelResidency:
    """The node's models and which of them are loaded."""

    def __init__(
        self,
        settings: GpuNodeSettings,
        locations: list[ModelLocation],
        executor: GpuExecutor,
        metrics: NodeMetrics,
        loader: Loader,
    ) -> None:
        self._settings = settings
        self.slots = {location.model_id: ModelSlot(location) for location in locations}
        self._executor = executor
        self._metrics = metrics
        self._loader = loader
        self._lock = asyncio.Lock()
        self.changed = asyncio.Event()

    @property
    def primary(self) -> str:
        return next(iter(self.slots))

    def inspect(self) -> None:
        """Read each prepared model's kind and size from disk (blocking)."""
        for slot in self.slots.values():
            path = slot.location.path
            if slot.location.source == "file":
                slot.kind = checkpoints.architecture(path).kind
            else:
                slot.kind = folder_kind(path)
            slot.footprint = weights_bytes(path)

    def loaded(self, model: str) -> bool:
        slot = self.slots.get(model)
        return slot is not None and slot.engine is not None

    def profile(self, model: str) -> ModelProfile | None:
        slot = self.slots.get(model)
        return None if slot is None else slot.profile

    def budget_bytes(self) -> int | None:
        """What loaded models may take; None while no device is known yet."""
        settings = self._settings
        device = next(
            (s.profile for s in self.slots.values() if s.profile is not None), None
        )
        if device is None:
            return None
        if device.device == "cpu" and settings.gpu_ram_budget_bytes is not None:
            return settings.gpu_ram_budget_bytes
        return int(device.memory_bytes * settings.gpu_memory_fraction)

    def fits(self, model: str) -> bool:
        """Whether `model` could be loaded beside the loaded ones."""
        budget = self.budget_bytes()
        if budget is None:
            return True
        used = sum(s.footprint for s in self.slots.values() if s.engine is not None)
        return used + self.slots[model].footprint <= budget

    def adopt(self, engine: Engine) -> None:
        """Take a model loaded elsewhere (tests share one engine)."""
        slot = self.slots[engine.profile.model]
        slot.engine, slot.profile = engine, engine.profile
        slot.last_used = time.monotonic()
        self._metrics.model_loaded.labels(slot.name).set(1)

    @contextlib.asynccontextmanager
    async def using(
        self, model: str, *, premium: bool, on_load: Callable[[], None] | None = None
    ) -> AsyncIterator[tuple[Engine, float | None]]:
        """The loaded `model` (loaded now if need be) and the seconds waited
        for it, None if it was loaded already (`on_load` is called first then);
        it is not unloaded until the block ends."""
        slot = self.slots.get(model)
        if slot is None:
            raise KeyError(model)
        slot.in_use += 1
        try:
            seconds = await self._ensure(slot, premium, on_load)
            engine = slot.engine
            if engine is None:
                raise RuntimeError(f"model {model} was unloaded while in use")
            slot.last_used = time.monotonic()
            yield engine, seconds
        finally:
            slot.in_use -= 1
            slot.last_used = time.monotonic()

    async def _ensure(
        self, slot: ModelSlot, premium: bool, on_load: Callable[[], None] | None
    ) -> float | None:
        if slot.engine is not None:
            return None
        # Told before the lock: a job waiting on another load of its model
        # (or on another model's load) waits for its model all the same.
        if on_load is not None:
            on_load()
        waiting = time.monotonic()
        async with self._lock:
            if slot.engine is not None:
                return time.monotonic() - waiting
            self._make_room(slot)
            started = time.monotonic()
            log.info("loading model %s", slot.name)
            location = slot.location
            future = self._executor.submit(
                lambda: self._loader(location), premium=premium
            )
            engine = await asyncio.wrap_future(future)
            seconds = time.monotonic() - started
            slot.engine, slot.profile = engine, engine.profile
            self._metrics.model_loads.labels(slot.name).inc()
            self._metrics.model_load_seconds.observe(seconds)
            self._metrics.model_loaded.labels(slot.name).set(1)
            log.info("loaded model %s in %.2f s", slot.name, seconds)
            self.changed.set()
            return time.monotonic() - waiting

    def _make_room(self, incoming: ModelSlot) -> None:
        """Unload least recently used idle models until `incoming` fits."""
        while not self.fits(incoming.name):
            idle = [
                s
                for s in self.slots.values()
                if s.engine is not None and s.in_use == 0 and s is not incoming
            ]
            if not idle:
                # Every loaded model runs a call: it goes over the budget
                # until they end rather than wait for them.
                log.warning("models in use exceed the memory budget")
                return
            victim = min(idle, key=lambda s: s.last_used)
            victim.engine = None
            self._metrics.model_loaded.labels(victim.name).set(0)
            log.info("unloaded model %s (least recently used)", victim.name)
            self.changed.set()

    async def preload(self) -> None:
        """Load, in catalogue order, the models that fit the budget now."""
        for slot in self.slots.values():
            if slot.engine is None and self.fits(slot.name):
                async with self.using(slot.name, premium=False):
                    pass

    def limits(self, model: str, max_batch: int | None) -> ModelLimits:
        """The model's limits: its own once loaded, else its kind's usual ones."""
        slot = self.slots[model]
        if slot.profile is not None:
            limits = slot.profile.limits
        else:
            native = 1024 if slot.kind.startswith("sdxl") else 512
            limits = GENERIC_LIMITS.model_copy(
                update={
                    "default_width": native,
                    "default_height": native,
                    "max_width": 2 * native,
                    "max_height": 2 * native,
                }
            )
        if max_batch:
            limits = limits.model_copy(update={"max_batch": max_batch})
        return limits

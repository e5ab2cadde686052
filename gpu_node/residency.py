"""Which of a node's models are in device memory: loaded on demand, LRU out.

A node serves a catalogue (SDAPI_MODELS). As many models stay loaded as their
weights fit in the memory budget (SDAPI_GPU_MEMORY_FRACTION of the device, or
SDAPI_GPU_RAM_BUDGET_BYTES on CPU); loading one more moves the least
recently used models that are not running a call out of the device. On a GPU
they go to host RAM first (`Engine.to_host`), from where they come back
faster than from disk, and are dropped once the models in host RAM are over
SDAPI_GPU_HOST_RAM_BUDGET_BYTES; on CPU, device and host memory are one, so
they are dropped at once. The model in use is never unloaded, so one model is
always served whatever the budget. Loads and moves run on the GPU thread, one
at a time, between pipeline calls.

Components with identical weights (a VAE of the same hash) are loaded once
and shared by the models of a diffusers folder (`SharedComponents`), and
counted once against the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gpu_node import checkpoints, weights
from gpu_node.calls import (
    SHAREABLE_COMPONENTS,
    Engine,
    ModelError,
    ModelProfile,
    SharedComponents,
)
from gpu_node.executor import GpuExecutor
from gpu_node.health import NodeMetrics
from gpu_node.settings import GpuNodeSettings
from gpu_node.weights import ModelLocation
from sdapi.contract.catalogue import CatalogueEntry
from sdapi.contract.nodes import GENERIC_LIMITS, ModelLimits

log = logging.getLogger(__name__)

# Loads a prepared model, reusing the shared components it can (blocking;
# called on the GPU thread).
Loader = Callable[[ModelLocation, SharedComponents], Engine]


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
    # Its engine is in host RAM, not on the device (a GPU node only).
    on_host: bool = False
    # Its weights' bytes by part: shareable components by the hash of their
    # weights (the same key in two models is one module), the rest its own.
    parts: dict[str, int] = field(default_factory=dict)
    # Shareable component name -> its key in `parts`.
    shared_keys: dict[str, str] = field(default_factory=dict)

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
        *,
        on_loaded: Callable[[str, float], None] | None = None,
    ) -> None:
        self._settings = settings
        # Told the seconds of each load from disk (the node learns them).
        self._on_loaded = on_loaded
        self.slots = {location.model_id: ModelSlot(location) for location in locations}
        self._executor = executor
        self._metrics = metrics
        self._loader = loader
        self._lock = asyncio.Lock()
        self.changed = asyncio.Event()
        # Weak: a shared module goes with the last engine that holds it.
        self.components: weakref.WeakValueDictionary[str, Any] = (
            weakref.WeakValueDictionary()
        )

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
            own = slot.footprint
            if path.is_dir():
                for name in SHAREABLE_COMPONENTS:
                    if not any((path / name).glob("*.safetensors")):
                        continue
                    key = f"{name}:{weights.weights_hash(path / name)}"
                    size = weights_bytes(path / name)
                    slot.shared_keys[name] = key
                    slot.parts[key] = size
                    own -= size
            slot.parts[f"{slot.name}:own"] = max(own, 0)

    def loaded(self, model: str) -> bool:
        """Whether `model` is on the device, ready without a load."""
        slot = self.slots.get(model)
        return slot is not None and slot.engine is not None and not slot.on_host

    def on_host(self, model: str) -> bool:
        slot = self.slots.get(model)
        return slot is not None and slot.engine is not None and slot.on_host

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

    def host_budget_bytes(self) -> int | None:
        """What models moved to host RAM may take; None: no host tier (CPU)."""
        device = next(
            (s.profile for s in self.slots.values() if s.profile is not None), None
        )
        if device is None or device.device == "cpu":
            return None
        budget = self._settings.gpu_host_ram_budget_bytes
        if budget is not None:
            return budget
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2

    def device_bytes(self, *also: str) -> int:
        """Weights on the device, shared components once, with models `also`."""
        parts: dict[str, int] = {}
        for slot in self.slots.values():
            if self.loaded(slot.name) or slot.name in also:
                parts.update(slot.parts or {f"{slot.name}:own": slot.footprint})
        return sum(parts.values())

    def fits(self, model: str) -> bool:
        """Whether `model` could be loaded beside the loaded ones."""
        budget = self.budget_bytes()
        if budget is None:
            return True
        return self.device_bytes(model) <= budget

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
        if self.loaded(slot.name):
            return None
        # Told before the lock: a job waiting on another load of its model
        # (or on another model's load) waits for its model all the same.
        if on_load is not None:
            on_load()
        waiting = time.monotonic()
        async with self._lock:
            if self.loaded(slot.name):
                return time.monotonic() - waiting
            await self._make_room(slot, premium)
            engine = slot.engine
            if engine is not None and slot.on_host:
                started = time.monotonic()
                await asyncio.wrap_future(
                    self._executor.submit(engine.to_device, premium=premium)
                )
                slot.on_host = False
                self._metrics.model_loaded.labels(slot.name).set(1)
                log.info(
                    "moved model %s back from host RAM in %.2f s",
                    slot.name,
                    time.monotonic() - started,
                )
                self.changed.set()
                return time.monotonic() - waiting
            started = time.monotonic()
            log.info("loading model %s", slot.name)
            location = slot.location
            shared = SharedComponents(slot.shared_keys, self.components)
            future = self._executor.submit(
                lambda: self._loader(location, shared), premium=premium
            )
            engine = await asyncio.wrap_future(future)
            seconds = time.monotonic() - started
            slot.engine, slot.profile, slot.on_host = engine, engine.profile, False
            self._metrics.model_loads.labels(slot.name).inc()
            self._metrics.model_load_seconds.observe(seconds)
            if self._on_loaded is not None:
                self._on_loaded(slot.name, seconds)
            self._metrics.model_loaded.labels(slot.name).set(1)
            log.info("loaded model %s in %.2f s", slot.name, seconds)
            self.changed.set()
            return time.monotonic() - waiting

    async def _make_room(self, incoming: ModelSlot, premium: bool) -> None:
        """Move least recently used idle models off the device until
        `incoming` fits: to host RAM where there is a host tier, else out."""
        while not self.fits(incoming.name):
            idle = [
                s
                for s in self.slots.values()
                if self.loaded(s.name) and s.in_use == 0 and s is not incoming
            ]
            if not idle:
                # Every loaded model runs a call: it goes over the budget
                # until they end rather than wait for them.
                log.warning("models in use exceed the memory budget")
                return
            victim = min(idle, key=lambda s: s.last_used)
            engine = victim.engine
            self._metrics.model_loaded.labels(victim.name).set(0)
            self.changed.set()
            host_budget = self.host_budget_bytes()
            if engine is None or host_budget is None or host_budget == 0:
                victim.engine = None
                log.info("unloaded model %s (least recently used)", victim.name)
                continue
            # Marked first: a job for it that starts meanwhile waits for the
            # lock and moves it back instead of running beside the move.
            victim.on_host = True
            keep = self._shared_on_device(victim)
            await asyncio.wrap_future(
                self._executor.submit(partial(engine.to_host, keep), premium=premium)
            )
            log.info("moved model %s to host RAM (least recently used)", victim.name)
            self._trim_host(host_budget, incoming)

    def _shared_on_device(self, slot: ModelSlot) -> set[str]:
        """`slot`'s components that a model on the device shares."""
        keys = {
            key
            for other in self.slots.values()
            if other is not slot and self.loaded(other.name)
            for key in other.shared_keys.values()
        }
        return {name for name, key in slot.shared_keys.items() if key in keys}

    def _trim_host(self, budget: int, incoming: ModelSlot) -> None:
        """Drop the least recently used models in host RAM while over `budget`
        (`incoming`, on its way back to the device, stays)."""
        while True:
            held = [
                s
                for s in self.slots.values()
                if self.on_host(s.name) and s is not incoming
            ]
            if not held or sum(s.footprint for s in held) <= budget:
                return
            victim = min(held, key=lambda s: s.last_used)
            victim.engine, victim.on_host = None, False
            log.info("dropped model %s from host RAM (least used)", victim.name)

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

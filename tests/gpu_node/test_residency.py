"""Which models stay where: device, host RAM, out; with engines that only count."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpu_node.calls import (
    Engine,
    ModelProfile,
    PipelineCall,
    SharedComponents,
    StepObserver,
)
from gpu_node.executor import GpuExecutor
from gpu_node.health import NodeMetrics
from gpu_node.residency import ModelResidency, weights_bytes
from gpu_node.weights import ModelLocation
from sdapi.contract.nodes import GENERIC_LIMITS
from tests.gpu_node.conftest import node_settings

GIB = 1 << 30


@dataclass
class CountingEngine:
    """An engine whose weights only move between places it records."""

    model: str
    device: str
    moves: list[str] = field(default_factory=list)

    @property
    def profile(self) -> ModelProfile:
        return ModelProfile(
            model=self.model,
            model_hash="0" * 64,
            pipeline="sd",
            device=self.device,
            memory_bytes=10 * GIB,
            limits=GENERIC_LIMITS,
            token_window=77,
        )

    def run(self, call: PipelineCall, observer: StepObserver) -> dict[str, Any]:
        raise AssertionError("these engines only move: nothing runs on them")

    def prompt_windows(self, text: str, syntax: str) -> int:
        return 1

    def memory_stats(self) -> dict[str, int]:
        return {}

    def to_host(self, keep: Collection[str] = ()) -> None:
        self.moves.append("host")

    def to_device(self) -> None:
        self.moves.append("device")


@contextlib.asynccontextmanager
async def residency(
    tmp_path: Path, device: str, **settings: Any
) -> AsyncIterator[tuple[ModelResidency, Callable[[], list[str]]]]:
    """Four 4 GiB models on a device whose budget (80% of 10 GiB) holds two."""
    loads: list[str] = []

    def load(location: ModelLocation, shared: SharedComponents) -> Engine:
        loads.append(location.model_id)
        return CountingEngine(location.model_id, device)

    executor = GpuExecutor(name="test-gpu")
    models = ModelResidency(
        node_settings(tmp_path, "redis://unused", **settings),
        [ModelLocation(name, tmp_path / name, "local") for name in "abcd"],
        executor,
        NodeMetrics(),
        load,
    )
    for slot in models.slots.values():
        slot.footprint = 4 * GIB
    try:
        yield models, lambda: loads
    finally:
        executor.shutdown()


def places(models: ModelResidency) -> dict[str, str]:
    return {
        name: "device"
        if models.loaded(name)
        else "host"
        if models.on_host(name)
        else "out"
        for name in models.slots
    }


async def use(models: ModelResidency, name: str) -> float | None:
    async with models.using(name, premium=False) as (_, seconds):
        return seconds


async def test_the_least_recently_used_model_moves_to_host_ram_then_out(
    tmp_path: Path,
) -> None:
    async with residency(
        tmp_path, "cuda:0 fake", gpu_host_ram_budget_bytes=4 * GIB
    ) as (models, loads):
        await use(models, "a")
        await use(models, "b")
        assert places(models) == {"a": "device", "b": "device", "c": "out", "d": "out"}
        await use(models, "c")
        assert places(models) == {"a": "host", "b": "device", "c": "device", "d": "out"}
        a = models.slots["a"].engine
        assert isinstance(a, CountingEngine) and a.moves == ["host"]
        # Back from host RAM without a load from disk.
        assert await use(models, "a") is not None
        assert places(models) == {"a": "device", "b": "host", "c": "device", "d": "out"}
        assert a.moves == ["host", "device"]
        assert loads() == ["a", "b", "c"]
        # Host RAM holds one model: moving `c` there drops `b`.
        await use(models, "d")
        assert places(models) == {"a": "device", "b": "out", "c": "host", "d": "device"}
        assert loads() == ["a", "b", "c", "d"]
        assert await use(models, "c") is not None
        assert loads() == ["a", "b", "c", "d"]
        assert await use(models, "c") is None


async def test_a_cpu_node_drops_models_without_a_host_tier(tmp_path: Path) -> None:
    async with residency(
        tmp_path, "cpu", gpu_ram_budget_bytes=8 * GIB, gpu_host_ram_budget_bytes=GIB
    ) as (models, loads):
        for name in "abc":
            await use(models, name)
        assert places(models) == {"a": "out", "b": "device", "c": "device", "d": "out"}
        assert loads() == ["a", "b", "c"]


async def test_two_models_with_the_same_vae_share_it_and_count_it_once(
    models_dir: Path,
) -> None:
    from gpu_node import pipeline
    from gpu_node.node import engine_loader, prepare_models

    folder = prepare_models(node_settings(models_dir, "redis://unused"))[0].path
    whole, vae_bytes = weights_bytes(folder), weights_bytes(folder / "vae")
    # A budget that holds both models only if their VAE counts once.
    settings = node_settings(
        models_dir,
        "redis://unused",
        models="tiny,other=tiny",
        gpu_ram_budget_bytes=2 * whole - vae_bytes,
    )
    executor = GpuExecutor(name="test-gpu")
    try:
        models = ModelResidency(
            settings,
            prepare_models(settings),
            executor,
            NodeMetrics(),
            engine_loader(settings),
        )
        await asyncio.to_thread(models.inspect)
        tiny, other = models.slots["tiny"], models.slots["other"]
        vae = tiny.shared_keys["vae"]
        assert other.shared_keys["vae"] == vae
        assert tiny.parts[vae] == vae_bytes
        async with (
            models.using("tiny", premium=False) as (first, _),
            models.using("other", premium=False) as (second, _),
        ):
            assert isinstance(first, pipeline.DiffusersEngine)
            assert isinstance(second, pipeline.DiffusersEngine)
            assert second.base.vae is first.base.vae
            assert second.base.unet is not first.base.unet
            assert models.device_bytes() == 2 * whole - vae_bytes
        assert models.loaded("tiny") and models.loaded("other")
    finally:
        executor.shutdown()

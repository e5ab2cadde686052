"""Benchmark: what switching models and LoRAs costs a node, and what it does
to images/s.

For the tiny model and (unless --no-sd15) an SD-1.5-architecture folder with
random weights (bench/pipeline.py's builder, no download), on the engine as
the node's residency drives it (gpu_node.pipeline.load_engine, Engine.run):

- a model switch from disk: one `load_engine` of a prepared model (the
  node's loader; the files are in the OS page cache after the first load);
- a model switch from host RAM: only a GPU node has a host tier (on CPU an
  unloaded model is dropped, gpu_node/residency.py), so none is measured here;
- a LoRA switch: the extra seconds of a call whose LoRA is loaded for it (a
  file not seen before) and of one whose adapter is already cached, over a
  call without LoRA; and alternating two cached adapters;
- images/s of one model, of two models alternating while both stay loaded,
  and of two alternating with room for one (every switch loads from disk,
  as SDAPI_GPU_RAM_BUDGET_BYTES=0 with SDAPI_GPU_SWITCH_AFTER_S=0 does).

    .venv/bin/python bench/models.py [--gpu] [--calls N] [--no-sd15]
        [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpu_node import pipeline, tiny, weights  # noqa: E402
from gpu_node.calls import (  # noqa: E402
    CallItem,
    Engine,
    LoraUse,
    PipelineCall,
    QuietObserver,
)
from gpu_node.loras import LoraFolder  # noqa: E402


def bench_pipeline() -> ModuleType:
    """bench/pipeline.py, for its SD-1.5 builder and machine description."""
    spec = importlib.util.spec_from_file_location(
        "bench_pipeline", REPO / "bench" / "pipeline.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Setup:
    name: str
    location: weights.ModelLocation
    size: int
    steps: int
    calls: int
    loads: int


def attention_targets(engine: Engine) -> list[tuple[str, int, int]]:
    """Every attention projection of the engine's UNet, as LoRAs train them."""
    import torch

    unet = engine._base.unet  # type: ignore[attr-defined]
    return [
        (name, module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear)
        and ".attn" in name
        and name.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"}
    ]


def write_lora(
    path: Path, targets: list[tuple[str, int, int]], seed: int, rank: int = 8
) -> Path:
    """A random kohya-format LoRA over `targets`."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, width_in, width_out in targets:
        prefix = "lora_unet_" + module.replace(".", "_")
        tensors[f"{prefix}.lora_down.weight"] = (
            torch.randn(rank, width_in, generator=generator) * 0.01
        )
        tensors[f"{prefix}.lora_up.weight"] = (
            torch.randn(width_out, rank, generator=generator) * 0.01
        )
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def call(setup: Setup, seed: int, loras: tuple[LoraUse, ...] = ()) -> PipelineCall:
    return PipelineCall(
        width=setup.size,
        height=setup.size,
        steps=setup.steps,
        guidance_scale=7.5,
        scheduler="euler",
        items=(CallItem("k", "a red fox in the snow", "blurry", (seed,)),),
        loras=loras,
    )


def timed(engine: Engine, work: PipelineCall) -> float:
    """Seconds `engine` takes for `work`."""
    started = time.perf_counter()
    engine.run(work, QuietObserver())
    return time.perf_counter() - started


def load(location: weights.ModelLocation, device: str) -> Engine:
    engine = pipeline.load_engine(location, device=device)
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return engine


def drop(engine: Engine | None) -> None:
    """Free an engine as the residency does when it unloads a model."""
    del engine
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def measure(setup: Setup, device: str, lora_dir: Path) -> dict[str, Any]:
    """Every figure of one model, in seconds or images/s."""
    out: dict[str, Any] = {}
    loads = []
    engine: Engine | None = None
    for _ in range(setup.loads):
        drop(engine)
        engine = None
        started = time.perf_counter()
        engine = load(setup.location, device)
        loads.append(time.perf_counter() - started)
    assert engine is not None
    out["loads"] = loads
    quiet = QuietObserver()
    run = engine.run
    run(call(setup, 0), quiet)  # warm-up: first-call allocations
    plain = [timed(engine, call(setup, n)) for n in range(setup.calls)]
    out["plain"] = plain

    targets = attention_targets(engine)
    files = [
        write_lora(lora_dir / f"{setup.name}-{n}.safetensors", targets, seed=n)
        for n in range(setup.calls + 2)
    ]
    folder = LoraFolder(lora_dir)
    folder.scan()

    def use(path: Path) -> tuple[LoraUse, ...]:
        found = folder.get(path.stem)
        assert found is not None
        return (LoraUse(path.stem, 0.8, found.path, found.sha256),)

    out["lora_modules"] = len(targets)
    # A LoRA file not seen before: read, converted and added as an adapter.
    out["lora_first"] = [
        timed(engine, call(setup, n, use(files[n]))) for n in range(setup.calls)
    ]
    a, b = use(files[-2]), use(files[-1])
    run(call(setup, 0, a), quiet)
    run(call(setup, 0, b), quiet)
    out["lora_cached"] = [timed(engine, call(setup, n, a)) for n in range(setup.calls)]
    out["lora_alternating"] = [
        timed(engine, call(setup, n, (a, b)[n % 2])) for n in range(setup.calls)
    ]

    out["one_model"] = setup.calls / sum(plain)
    other = weights.ModelLocation(
        f"{setup.name}-other", setup.location.path, setup.location.source
    )
    if setup.name == "tiny":
        second = load(other, device)
        run2 = second.run
        run2(call(setup, 0), quiet)
        both = sum(
            timed((engine, second)[n % 2], call(setup, n)) for n in range(setup.calls)
        )
        out["two_loaded"] = setup.calls / both
        drop(second)
    # Room for one model: each call after a switch loads its model first.
    drop(engine)
    engine = None
    started = time.perf_counter()
    switches = max(2, setup.calls // 2)
    for n in range(switches):
        current = load((setup.location, other)[n % 2], device)
        current.run(call(setup, n), quiet)
        drop(current)
    out["one_slot"] = switches / (time.perf_counter() - started)
    return out


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f}"


def report(setup: Setup, figures: dict[str, Any]) -> None:
    base = statistics.median(figures["plain"])
    first = statistics.median(figures["lora_first"]) - base
    cached = statistics.median(figures["lora_cached"]) - base
    alternating = statistics.median(figures["lora_alternating"]) - base
    print(
        f"\n### {setup.name}: {setup.size}x{setup.size}, {setup.steps} steps, "
        f"batch 1, {setup.calls} calls per figure"
    )
    print("\n| what | seconds (fastest / median) |")
    print("| --- | ---: |")
    print(f"| model switch from disk (load_engine) | {spread(figures['loads'])} |")
    print("| model switch from host RAM | CPU node: no host tier, not measured |")
    print(f"| call without LoRA | {spread(figures['plain'])} |")
    print(
        f"| call with a LoRA loaded for it ({figures['lora_modules']} modules)"
        f" | {spread(figures['lora_first'])} |"
    )
    print(f"| call with a cached LoRA | {spread(figures['lora_cached'])} |")
    print(
        f"| call alternating two cached LoRAs | {spread(figures['lora_alternating'])} |"
    )
    print(
        f"\nLoRA switch over a plain call (medians): first load +{first:.3f} s, "
        f"cached +{cached:.3f} s, alternating cached +{alternating:.3f} s"
    )
    print("\n| models | images/s |")
    print("| --- | ---: |")
    print(f"| one model | {figures['one_model']:.2f} |")
    if "two_loaded" in figures:
        print(f"| two alternating, both loaded | {figures['two_loaded']:.2f} |")
    print(f"| two alternating, room for one | {figures['one_slot']:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="run on CUDA")
    parser.add_argument("--calls", type=int, default=0, help="calls per figure")
    parser.add_argument("--no-sd15", action="store_true", help="the tiny model only")
    parser.add_argument("--model-dir", type=Path, help="reuse built models from here")
    args = parser.parse_args()

    import torch

    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs CUDA")
    device = "cuda" if args.gpu else "cpu"
    helpers = bench_pipeline()
    with tempfile.TemporaryDirectory() as tmp:
        models = args.model_dir or Path(tmp)
        lora_dir = Path(tmp) / "loras"
        lora_dir.mkdir()
        tiny_location = weights.locate_model("tiny", models)
        tiny.prepare_model(tiny_location)
        setups = [Setup("tiny", tiny_location, 64, 4, args.calls or 6, 3)]
        if not args.no_sd15:
            sd15 = weights.ModelLocation("sd15-random", models / "sd15-random", "local")
            if not weights.is_complete(sd15.path):
                started = time.perf_counter()
                weights.install_folder(sd15.path, helpers.build_sd15_random)
                built = time.perf_counter() - started
                print(f"built random SD-1.5 weights in {built:.1f} s")
            size, steps = (512, 25) if args.gpu else (64, 2)
            setups.append(Setup("sd15-random", sd15, size, steps, args.calls or 4, 2))
        results = [(setup, measure(setup, device, lora_dir)) for setup in setups]
    print(f"\n{helpers.machine()}, device {device}")
    for setup, figures in results:
        report(setup, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

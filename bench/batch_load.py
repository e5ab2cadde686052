"""Benchmark: premium latency while normal batches saturate the node, and the
batches' throughput with premium work interleaved against batches alone.

A tiny GPU node runs in this process on an embedded Valkey (as in
`bench/pipeline.py`). Three kinds of phase alternate, `--rounds` times:

  idle     premium `generate` requests one after the other on an idle node
  alone    `--batches` normal `generate_batch` jobs of `--batch` images, at
           least two always queued so that the node never waits for work
  mixed    the same batches, plus a premium request every `--premium-every`
           seconds (one at a time)

A premium request's latency runs from its enqueue until its `store_result`
job is on the results queue (polled every 2 ms; batches every 20 ms). Batch
throughput is images per second from the first batch's enqueue to the last
one's result. The premium requests take device time of their own, so the
mixed throughput is also given net of it: the batch images over the phase's
time less the premium requests' idle median each.

    .venv/bin/python bench/batch_load.py [--rounds 3] [--batches 40] [--batch 4]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The node and this process share the machine's cores: one torch thread, as
# `sdapi dev` gives a node on two cores (set before torch loads).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.pipeline import machine  # noqa: E402
from gpu_node import pipeline, tiny, weights  # noqa: E402
from sdapi.contract.names import result_job_id  # noqa: E402
from sdapi.contract.payloads import (  # noqa: E402
    BatchJob,
    GenerationJob,
    GenerationParams,
)
from sdapi.contract.status import Tier  # noqa: E402
from sdapi.infra import loops  # noqa: E402

# Result polls: every 2 ms for a premium request, every 20 ms for a batch
# (the batches' polls share the node's event loop and GIL; 20 ms is 0.2% of
# a phase).
PREMIUM_POLL_S = 0.002
BATCH_POLL_S = 0.02


@dataclass
class Figures:
    idle: list[float] = field(default_factory=list)
    loaded: list[float] = field(default_factory=list)
    alone: list[float] = field(default_factory=list)  # batch images/s
    mixed: list[float] = field(default_factory=list)
    mixed_net: list[float] = field(default_factory=list)
    premium_per_phase: list[int] = field(default_factory=list)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class Bench:
    def __init__(self, pool: Any, model: str, args: argparse.Namespace) -> None:
        self.pool = pool
        self.model = model
        self.args = args
        self.seed = 0

    def _job(self, tier: Tier) -> GenerationJob:
        self.seed += 1
        return GenerationJob(
            generation_id=uuid.uuid4(),
            model=self.model,
            tier=tier,
            params=GenerationParams(
                prompt=f"a lighthouse on a cliff, take {self.seed}",
                width=self.args.size,
                height=self.args.size,
                steps=self.args.steps,
                guidance_scale=7.5,
                seed=self.seed,
                num_images=1,
                scheduler="euler_a",
            ),
        )

    async def _wait(self, jobs: list[GenerationJob], poll_s: float) -> None:
        from arq.constants import job_key_prefix

        keys = [job_key_prefix + result_job_id(j.generation_id) for j in jobs]
        while await self.pool.exists(*keys) < len(keys):  # noqa: ASYNC110
            await asyncio.sleep(poll_s)

    async def premium(self) -> float:
        from sdapi.infra.queue import enqueue_generation

        job = self._job(Tier.PREMIUM)
        started = time.perf_counter()
        await enqueue_generation(self.pool, job, owner="bench")
        await self._wait([job], PREMIUM_POLL_S)
        return time.perf_counter() - started

    async def batches(self, count: int) -> float:
        """Run `count` batches, two queued at all times; seconds taken."""
        from sdapi.infra.queue import enqueue_batch

        async def one() -> None:
            jobs = [self._job(Tier.NORMAL) for _ in range(self.args.batch)]
            batch = BatchJob(batch_id=uuid.uuid4(), model=self.model, items=jobs)
            await enqueue_batch(self.pool, batch)
            await self._wait(jobs, BATCH_POLL_S)

        started = time.perf_counter()
        running: set[asyncio.Task[None]] = set()
        left = count
        while left or running:
            while left and len(running) < 3:
                running.add(asyncio.create_task(one()))
                left -= 1
            done, running = await asyncio.wait(
                running, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                task.result()
        return time.perf_counter() - started

    async def mixed(self, count: int) -> tuple[float, list[float]]:
        """`batches(count)` with a premium request every `premium_every` s."""
        latencies: list[float] = []
        loaded = asyncio.create_task(self.batches(count))
        # Let the batches fill the node first.
        await asyncio.sleep(self.args.premium_every / 2)
        while not loaded.done():
            tick = time.perf_counter()
            latencies.append(await self.premium())
            if loaded.done():
                # Ended while the premium request ran: not under load.
                latencies.pop()
                break
            pause = self.args.premium_every - (time.perf_counter() - tick)
            await asyncio.wait({loaded}, timeout=max(pause, 0))
        return await loaded, latencies


async def measure(engine: Any, models: Path, args: argparse.Namespace) -> Figures:
    from gpu_node.node import GpuNode
    from gpu_node.settings import GpuNodeSettings
    from sdapi.devtools.embedded import EmbeddedValkey
    from sdapi.infra.queue import create_queue_pool

    figures = Figures()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedValkey(Path(tmp)) as server:
        settings = GpuNodeSettings.from_env(
            model=engine.profile.model,
            model_dir=models,
            redis_url=server.url,
            node_id="bench",
            gpu_max_batch=args.batch,
            gpu_health_port=0,
            consul_url=None,
        )
        node = GpuNode(settings, server.url, engine=engine)
        await node.start()
        serving = asyncio.create_task(node.serve())
        pool = await create_queue_pool(server.url)
        bench = Bench(pool, engine.profile.model, args)
        try:
            # Warm-up: both paths once.
            await bench.premium()
            await bench.batches(2)
            for _ in range(args.rounds):
                for _ in range(args.idle):
                    figures.idle.append(await bench.premium())
                images = args.batches * args.batch
                seconds = await bench.batches(args.batches)
                figures.alone.append(images / seconds)
                seconds, latencies = await bench.mixed(args.batches)
                figures.loaded += latencies
                figures.mixed.append(images / seconds)
                figures.premium_per_phase.append(len(latencies))
                own = len(latencies) * statistics.median(figures.idle)
                figures.mixed_net.append(images / max(seconds - own, 1e-9))
        finally:
            await pool.aclose()
            node.request_stop()
            await serving
            await node.close()
    return figures


def report(figures: Figures, args: argparse.Namespace) -> str:
    def ms(values: list[float], p: float) -> str:
        return f"{percentile(values, p) * 1000:.0f}"

    idle50 = percentile(figures.idle, 50)
    alone = statistics.median(figures.alone)
    mixed = statistics.median(figures.mixed)
    net = statistics.median(figures.mixed_net)
    lines = [
        f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end.",
        f"Tiny model, {args.size}x{args.size}, {args.steps} steps; {args.rounds} "
        f"rounds of: {args.idle} idle premium requests, {args.batches} batches of "
        f"{args.batch} alone, the same with a premium request every "
        f"{args.premium_every:g} s ({sum(figures.premium_per_phase)} under load).",
        "",
        "| premium latency (ms) | p50 | p90 | max |",
        "| --- | ---: | ---: | ---: |",
        f"| idle node | {ms(figures.idle, 50)} | {ms(figures.idle, 90)} "
        f"| {ms(figures.idle, 100)} |",
        f"| batches saturating the node | {ms(figures.loaded, 50)} "
        f"| {ms(figures.loaded, 90)} | {ms(figures.loaded, 100)} |",
        "",
        f"Premium under load / idle (p50): "
        f"**{percentile(figures.loaded, 50) / idle50:.2f}x** (goal 1.1x); p90: "
        f"{percentile(figures.loaded, 90) / percentile(figures.idle, 90):.2f}x.",
        "",
        "| batch images/s (median of rounds) | value | / alone |",
        "| --- | ---: | ---: |",
        f"| batches alone | {alone:.2f} | 1.00 |",
        f"| with premium interleaved | {mixed:.2f} | **{mixed / alone:.2f}** |",
        f"| with premium, net of its own device time | {net:.2f} "
        f"| **{net / alone:.2f}** |",
        "",
        "Per round (alone / mixed images/s): "
        + ", ".join(
            f"{a:.2f}/{m:.2f}"
            for a, m in zip(figures.alone, figures.mixed, strict=True)
        ),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, default=6, help="idle premium per round")
    parser.add_argument("--batches", type=int, default=40, help="batches per phase")
    parser.add_argument("--batch", type=int, default=4, help="images per batch")
    parser.add_argument("--premium-every", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, help="reuse a built tiny model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sdapi-bench-") as tmp:
        models = args.model_dir or Path(tmp)
        location = weights.locate_model("tiny", models)
        tiny.prepare_model(location)
        engine = pipeline.load_engine(location, device="cpu")
        # uvloop, as the node's own process runs.
        figures = loops.run(measure(engine, models, args))
    print(report(figures, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

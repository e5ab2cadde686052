"""Benchmark: how honest the estimated times are, and what they cost.

Starts `sdapi dev` (web, jobs and a tiny GPU node on embedded PostgreSQL and
Valkey) in a temporary data folder with a premium user, lets the node learn
with a few sequential requests, then sends a long stream of premium
`generate` messages on one WebSocket, with random (Poisson) arrivals at a
given share of the node's measured capacity, so the queue grows and drains.
For each request it compares the `eta_s` of its `accepted` frame (the
estimate given at submit) with the time its `done` frame really came.

Meanwhile it times GET /api/v1/generations/{id} of the last request sent (a
queued one, with work ranked before it: the estimate reads the queue, the
payloads ahead and the learned speeds) against the GET of a finished one
(no Redis reads), to show what the estimate adds to a read.

    .venv/bin/python bench/eta.py [--requests 200] [--steps 25] [--load 0.8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The node and this process share two cores with web and jobs: one torch
# thread each keeps torch from spinning against the others.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from bench.pipeline import machine  # noqa: E402
from bench.premium_latency import percentile, premium_token, start_dev  # noqa: E402

LEARN = 5


@dataclass
class Estimate:
    sent: float
    eta_s: float | None
    position: int | None
    done: float | None = None
    # Seconds from `generate` to its `accepted` frame (the submit, with the
    # estimates of its `queued` event and of its view).
    accept_s: float = 0.0
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def actual(self) -> float:
        assert self.done is not None
        return self.done - self.sent

    @property
    def error(self) -> float:
        assert self.eta_s is not None
        return (self.eta_s - self.actual) / self.actual


def request(steps: int, size: int, n: int) -> dict[str, Any]:
    return {
        "prompt": "a lighthouse on a cliff at dusk",
        "width": size,
        "height": size,
        "steps": steps,
        "seed": 1000 + n,
    }


async def timed_get(http: aiohttp.ClientSession, url: str, token: str) -> float:
    started = time.perf_counter()
    async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200, await r.text()
        await r.read()
    return time.perf_counter() - started


async def run(
    base_url: str, token: str, count: int, steps: int, size: int, load: float
) -> tuple[list[Estimate], list[float], list[float], float]:
    ws_url = base_url.replace("http://", "ws://", 1) + "/api/v1/ws"
    headers = {"Authorization": f"Bearer {token}"}
    estimates: dict[str, Estimate] = {}
    accepted: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    queued_gets: list[float] = []
    finished_gets: list[float] = []
    async with (
        aiohttp.ClientSession(base_url=base_url) as http,
        http.ws_connect(ws_url, headers=headers, max_msg_size=0) as ws,
    ):

        async def read() -> None:
            async for message in ws:
                frame = message.json()
                if frame["type"] in ("accepted", "error"):
                    await accepted.put(frame)
                elif frame["type"] == "done" and frame["id"] in estimates:
                    estimates[frame["id"]].done = time.time()
                    estimates[frame["id"]].ended.set()

        reader = asyncio.create_task(read())

        async def send(n: int) -> Estimate:
            sent = time.time()
            await ws.send_json({"type": "generate", "request": request(steps, size, n)})
            frame = await accepted.get()
            if frame["type"] == "error":
                raise RuntimeError(frame)
            view = frame["generation"]
            estimate = Estimate(
                sent,
                view["eta_s"],
                view["queue_position"],
                accept_s=time.time() - sent,
            )
            estimates[frame["id"]] = estimate
            return estimate

        async def finished(estimate: Estimate) -> None:
            await estimate.ended.wait()

        # The node learns: requests one after the other.
        for n in range(LEARN):
            await finished(await send(n))
        first = next(iter(estimates))
        # The first run warms the node up: the others say its pace.
        mean_run = statistics.median(e.actual for e in list(estimates.values())[1:])
        estimates.clear()
        rng = random.Random(17)
        last = ""
        for n in range(count):
            estimate = await send(LEARN + n)
            last = next(reversed(estimates))
            if estimate.position:
                queued_gets.append(
                    await timed_get(http, f"/api/v1/generations/{last}", token)
                )
                finished_gets.append(
                    await timed_get(http, f"/api/v1/generations/{first}", token)
                )
            await asyncio.sleep(rng.expovariate(load / mean_run))
        for estimate in list(estimates.values()):
            await asyncio.wait_for(finished(estimate), 600)
        reader.cancel()
    return list(estimates.values()), queued_gets, finished_gets, mean_run


def report(
    estimates: list[Estimate],
    queued_gets: list[float],
    finished_gets: list[float],
    mean_run: float,
    args: argparse.Namespace,
) -> str:
    known = [e for e in estimates if e.eta_s is not None]

    def share(bound: float, among: list[Estimate]) -> str:
        inside = sum(abs(e.error) <= bound for e in among)
        return f"{100 * inside / max(len(among), 1):.0f}%"

    waiting = [e for e in known if e.position]
    idle = [e for e in known if not e.position]
    deepest = max((e.position or 0) for e in estimates)
    lines = [
        f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end.",
        f"{len(estimates)} premium requests after {LEARN} learning ones, tiny "
        f"model, {args.size}x{args.size}, {args.steps} steps; arrivals at "
        f"{args.load:g} of capacity (a run took {mean_run:.2f} s, median of the "
        "learning runs); "
        f"queue up to {deepest} ahead; {len(known)} estimates given "
        f"({len(estimates) - len(known)} null).",
        "",
        "| estimates | within +-50% | within +-25% | median error | p10 / p90 error |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, among in (("all", known), ("work ahead", waiting), ("idle", idle)):
        if not among:
            continue
        errs = sorted(e.error for e in among)
        p10, p90 = percentile(errs, 10), percentile(errs, 90)
        lines.append(
            f"| {name} ({len(among)}) | {share(0.5, among)} | {share(0.25, among)} "
            f"| {100 * statistics.median(errs):+.0f}% "
            f"| {100 * p10:+.0f}% / {100 * p90:+.0f}% |"
        )
    if queued_gets and finished_gets:
        accepts = [e.accept_s for e in estimates if e.position]

        def ms(values: list[float], p: float) -> str:
            return f"{1000 * percentile(values, p):.1f}"

        lines += [
            "",
            "| GET /api/v1/generations/{id} | p50 ms | p99 ms |",
            "| --- | ---: | ---: |",
            f"| queued, work ahead (with the estimate) | {ms(queued_gets, 50)} "
            f"| {ms(queued_gets, 99)} |",
            f"| finished (no Redis read) | {ms(finished_gets, 50)} "
            f"| {ms(finished_gets, 99)} |",
            f"| (WebSocket `generate` -> `accepted`, work ahead) "
            f"| {ms(accepts, 50)} | {ms(accepts, 99)} |",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument(
        "--load", type=float, default=0.8, help="arrival rate / node capacity"
    )
    parser.add_argument("--model-dir", type=Path, help="reuse a built tiny model")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdapi-bench-") as tmp:
        root = Path(tmp)
        models = args.model_dir or root / "models"
        dev, base_url = start_dev(
            root,
            models,
            premium_max_in_flight=str(args.requests + LEARN),
            premium_images_per_day=str(10 * (args.requests + LEARN)),
            ws_max_relays=str(args.requests + LEARN),
        )
        try:
            token = asyncio.run(premium_token(base_url, root))
            results = asyncio.run(
                run(base_url, token, args.requests, args.steps, args.size, args.load)
            )
        finally:
            dev.send_signal(2)  # SIGINT, as Ctrl-C
            dev.wait(timeout=60)
            if dev.stdout is not None:
                dev.stdout.close()
    print(report(*results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

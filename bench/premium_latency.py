"""Benchmark: what the service adds to a premium request's pipeline time.

Starts `sdapi dev` (web, jobs and a tiny GPU node on embedded PostgreSQL and
Valkey) in a temporary data folder, makes a premium user the way an operator
would (signup, `sdapi user set-premium`, signin), then sends sequential
`generate` messages on one WebSocket. For each request it times submit ->
the image frame, and runs the same call (same model, size, steps, seed) on
the raw pipeline in this process right after, so both see the same machine
load; the difference is the service's overhead. Reports p50/p99 of the
overhead and of its phases, from the frames' arrival times:

  accept   send -> `accepted` (validation, the DB transaction, the enqueue)
  pickup   `accepted` -> `started` (the node's poll and claim, the relay)
  steps    `started` -> last `progress` (the pipeline's steps and events)
  finish   last `progress` -> `image` (VAE decode, PNG, Redis, relay, base64)

    .venv/bin/python bench/premium_latency.py [--requests 100] [--steps 20]
        [--setting gpu_progress_interval_s=0 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The node and this process share two cores with web and jobs: one torch
# thread each keeps torch from spinning against the others (set before torch
# loads; the dev children inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from bench.pipeline import machine  # noqa: E402
from gpu_node import pipeline, weights  # noqa: E402
from gpu_node.calls import (  # noqa: E402
    CallItem,
    Engine,
    PipelineCall,
    QuietObserver,
)
from sdapi.devtools.mailsink import read_messages  # noqa: E402
from sdapi.devtools.net import free_port  # noqa: E402

PASSWORD = "bench-password-123"  # noqa: S105 (a throwaway local account)
WARMUP = 3
PHASES = ("accept", "pickup", "steps", "finish")


@dataclass
class Sample:
    e2e: float
    raw: float
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def overhead(self) -> float:
        return self.e2e - self.raw


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def start_dev(
    root: Path,
    models: Path,
    node_poll_s: float | None = None,
    **settings: str,
) -> tuple[subprocess.Popen[bytes], str]:
    """`sdapi dev` in `root`; `settings` as SDAPI_<NAME> variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDAPI_")}
    env.update(
        SDAPI_DATA_DIR=str(root / "data"),
        SDAPI_MODEL_DIR=str(models),
        SDAPI_PORT=str(free_port()),
        SDAPI_LOG_LEVEL="WARNING",
    )
    env.update({f"SDAPI_{name.upper()}": value for name, value in settings.items()})
    if node_poll_s is not None:
        env["SDAPI_GPU_PREMIUM_POLL_S"] = str(node_poll_s)
    with (root / "dev.log").open("wb") as log:
        dev = subprocess.Popen(
            [sys.executable, "-m", "sdapi", "dev"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
    assert dev.stdout is not None
    line = dev.stdout.readline().decode()
    found = re.search(r"open (http://\S+)/ ", line)
    if not found:
        dev.kill()
        raise SystemExit(f"sdapi dev did not start; see {root / 'dev.log'}")
    return dev, found.group(1)


def find_link(folder: Path) -> str | None:
    """The verification link of the first email kept in `folder`, if any."""
    for raw in read_messages(folder) if folder.exists() else []:
        message = email.message_from_bytes(raw, policy=email.policy.default)
        body = message.get_body(preferencelist=("plain",))
        text = "" if body is None else str(body.get_content())  # type: ignore[attr-defined]
        found = re.search(r"https?://\S+/api/v1/auth/verify\?token=\S+", text)
        if found:
            return found.group(0)
    return None


async def verification_link(folder: Path, timeout_s: float = 60) -> str:
    """The verification link `sdapi dev` emailed to its mail folder."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        link = await asyncio.to_thread(find_link, folder)
        if link is not None:
            return link
        await asyncio.sleep(0.2)
    raise SystemExit(f"no verification email in {folder}")


async def premium_token(base_url: str, root: Path) -> str:
    """Signup, `sdapi user set-premium`, signin: a premium bearer token."""
    email = "bench@example.org"
    async with aiohttp.ClientSession(base_url=base_url) as http:
        body = {"email": email, "password": PASSWORD}
        async with http.post("/api/v1/auth/signup", json=body) as response:
            assert response.status == 201, await response.text()
        # Generating needs a verified address: follow the emailed link.
        link = await verification_link(root / "data" / "mail")
        async with http.get(link) as response:
            assert response.status < 400, await response.text()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDAPI_")}
        env["SDAPI_DATA_DIR"] = str(root / "data")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdapi",
            "user",
            "set-premium",
            email,
            "--days",
            "1",
            env=env,
        )
        assert await process.wait() == 0
        async with http.post("/api/v1/auth/signin", json=body) as response:
            assert response.status == 200, await response.text()
            token: str = (await response.json())["token"]
            return token


async def one_request(
    ws: aiohttp.ClientWebSocketResponse, request: dict[str, Any]
) -> tuple[float, dict[str, float]]:
    """Seconds from sending `generate` to the image frame, and the phases."""
    sent = time.perf_counter()
    await ws.send_json({"type": "generate", "request": request})
    seen: dict[str, float] = {}
    image_at = 0.0
    while True:
        frame = await ws.receive_json(timeout=60)
        now = time.perf_counter()
        kind = frame["type"]
        if kind == "error":
            raise RuntimeError(frame)
        if kind == "progress":
            seen["last_progress"] = now
        else:
            seen.setdefault(kind, now)
        if kind == "image":
            image_at = now
        if kind == "done":
            break
    phases = {
        "accept": seen["accepted"] - sent,
        "pickup": seen["started"] - seen["accepted"],
        "steps": seen["last_progress"] - seen["started"],
        "finish": image_at - seen["last_progress"],
    }
    return image_at - sent, phases


def raw_seconds(engine: Engine, request: dict[str, Any], scheduler: str) -> float:
    call = PipelineCall(
        width=request["width"],
        height=request["height"],
        steps=request["steps"],
        guidance_scale=request["guidance_scale"],
        scheduler=scheduler,
        items=(CallItem("bench", request["prompt"], "", (request["seed"],)),),
    )
    started = time.perf_counter()
    engine.run(call, QuietObserver())
    return time.perf_counter() - started


async def measure(
    base_url: str, token: str, engine: Engine, count: int, size: int, steps: int
) -> list[Sample]:
    scheduler = engine.profile.limits.default_scheduler
    ws_url = base_url.replace("http://", "ws://", 1) + "/api/v1/ws"
    samples: list[Sample] = []
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url, headers=headers) as ws,
    ):
        for i in range(WARMUP + count):
            request = {
                "prompt": "a lighthouse on a cliff at dusk",
                "width": size,
                "height": size,
                "steps": steps,
                "guidance_scale": 7.5,
                "scheduler": scheduler,
                "seed": 1000 + i,
            }
            e2e, phases = await one_request(ws, request)
            raw = raw_seconds(engine, request, scheduler)
            if i >= WARMUP:
                samples.append(Sample(e2e, raw, phases))
    return samples


def report(samples: list[Sample], size: int, steps: int, poll: float | None) -> str:
    def row(name: str, values: list[float]) -> str:
        ms = [v * 1000 for v in values]
        return (
            f"| {name} | {percentile(ms, 50):.1f} | {percentile(ms, 99):.1f} "
            f"| {statistics.mean(ms):.1f} |"
        )

    lines = [
        f"Machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the end.",
        f"{len(samples)} sequential premium requests (after {WARMUP} warm-up), "
        f"tiny model, {size}x{size}, {steps} steps, one image each; node premium "
        f"poll {'default' if poll is None else f'{poll * 1000:g} ms'}.",
        "",
        "| ms | p50 | p99 | mean |",
        "| --- | ---: | ---: | ---: |",
        row("**overhead** (submit->image minus raw)", [s.overhead for s in samples]),
        row("submit -> image frame", [s.e2e for s in samples]),
        row("raw pipeline (same call, in-process)", [s.raw for s in samples]),
    ]
    lines += [row(f"phase: {p}", [s.phases[p] for s in samples]) for p in PHASES]
    # Where the tail comes from: a slow `steps` phase with a normal accept,
    # pickup and finish is the machine slowing the pipeline itself down.
    worst = sorted(samples, key=lambda s: s.overhead, reverse=True)[:5]
    lines += [
        "",
        "Worst overheads (ms): overhead = e2e - raw; phases accept/pickup/steps/finish",
    ]
    lines += [
        f"- {s.overhead * 1000:.0f} = {s.e2e * 1000:.0f} - {s.raw * 1000:.0f}; "
        + "/".join(f"{s.phases[p] * 1000:.0f}" for p in PHASES)
        for s in worst
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model-dir", type=Path, help="reuse a built tiny model")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an SDAPI_NAME setting for the dev processes (repeatable), "
        "e.g. gpu_progress_interval_s=0",
    )
    parser.add_argument(
        "--node-poll",
        type=float,
        help="SDAPI_GPU_PREMIUM_POLL_S for the node (default: the node's own)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sdapi-bench-") as tmp:
        root = Path(tmp)
        models = args.model_dir or root / "models"
        settings = dict(item.split("=", 1) for item in args.setting)
        dev, base_url = start_dev(root, models, args.node_poll, **settings)
        try:
            token = asyncio.run(premium_token(base_url, root))
            location = weights.locate_model("tiny", models)
            engine = pipeline.load_engine(location, device="cpu")
            samples = asyncio.run(
                measure(base_url, token, engine, args.requests, args.size, args.steps)
            )
        finally:
            dev.send_signal(2)  # SIGINT, as Ctrl-C
            dev.wait(timeout=60)
            if dev.stdout is not None:
                dev.stdout.close()
    print(report(samples, args.size, args.steps, args.node_poll))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

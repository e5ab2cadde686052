"""Benchmarks of one `sdapi web` process: submit throughput and WebSocket fan-out.

Starts embedded PostgreSQL and Valkey and one `sdapi web` (no GPU node: the
premium submits only queue, which is what is measured), then:

  submit   premium POST /api/v1/generations from 32 concurrent clients for
           a fixed time: requests/s, p50/p99, errors; then the same load on a
           minimal aiohttp JSON handler in another process, for the ratio.
  fanout   1,000 WebSockets follow one generation; this process appends
           progress events to its stream as a GPU node does and times each
           event from its append to its arrival at every client.

    .venv/bin/python bench/web_load.py [--seconds 15] [--sockets 1000]

To compare trees side by side in one run (say, main checked out in
/tmp/before), `--trees before=/tmp/before after=.` starts one `sdapi web`
per tree (each on its own database, migrated by that tree; one Valkey) and
alternates the submit load between them `--rounds` times (no baseline, no
fan-out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import redis.asyncio  # noqa: E402

from bench.pipeline import machine  # noqa: E402
from sdapi.contract.events import ProgressEvent  # noqa: E402
from sdapi.db.connection import apply_migrations, open_database  # noqa: E402
from sdapi.devtools.embedded import EmbeddedValkey, embedded_postgres  # noqa: E402
from sdapi.devtools.net import free_port  # noqa: E402
from sdapi.infra.streams import append_event  # noqa: E402

CONCURRENCY = 32
USERS = 40
BODY = {"prompt": "a benchmark", "width": 64, "height": 64, "steps": 4}

MINIMAL_SERVER = """
import sys
from aiohttp import web

async def handler(request):
    await request.json()
    return web.json_response({"id": "x", "status": "queued"}, status=202)

app = web.Application()
app.router.add_post("/api/v1/generations", handler)
app.router.add_get("/healthz", lambda r: web.json_response({"status": "ok"}))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def wait_ready(url: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer")
            await asyncio.sleep(0.1)


async def load(
    url: str, headers: list[dict[str, str]], seconds: float
) -> dict[str, Any]:
    """CONCURRENCY clients posting for `seconds`: rate, latency, errors."""
    latencies: list[float] = []
    errors: dict[int, int] = {}
    stop_at = time.monotonic() + seconds

    async def client(n: int, http: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            async with http.post(
                url, json=BODY, headers=headers[n % len(headers)]
            ) as response:
                await response.read()
                if response.status != 202:
                    errors[response.status] = errors.get(response.status, 0) + 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(n, http) for n in range(CONCURRENCY)))
        took = time.monotonic() - started
    return {
        "requests": len(latencies),
        "rps": len(latencies) / took,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "errors": errors,
    }


async def make_users(database_url: str, count: int) -> list[dict[str, str]]:
    from sdapi.devtools.accounts import make_user

    async with open_database(database_url, pool_size=2):
        return [(await make_user(premium=True)).headers for _ in range(count)]


async def fanout(
    base_url: str, redis_url: str, database_url: str, sockets: int, events: int
) -> dict[str, Any]:
    """Time each progress event from its append to every subscriber."""
    from sdapi.db.models import Generation
    from sdapi.devtools.accounts import auth, make_user

    async with open_database(database_url, pool_size=2):
        user, secret = await make_user(premium=True)
        generation = await Generation.create(
            id=uuid.uuid4(),
            user=user,
            tier="premium",
            status="running",
            delivery="download",
            model="tiny",
            request={**BODY, "model": "tiny", "seed": 1, "num_images": 1},
            width=64,
            height=64,
            steps=events,
            guidance_scale=7.5,
            scheduler="euler",
            num_images=1,
            attempts=1,
        )
    ws_url = base_url.replace("http://", "ws://", 1) + "/api/v1/ws"
    arrivals: list[list[float]] = [[] for _ in range(events)]
    subscribed = asyncio.Event()
    count = 0
    done = asyncio.Event()
    finished = 0

    async def subscriber(http: aiohttp.ClientSession) -> None:
        nonlocal count, finished
        async with http.ws_connect(ws_url, headers=auth(secret)) as ws:
            await ws.send_json({"type": "subscribe", "id": str(generation.id)})
            count += 1
            if count == sockets:
                subscribed.set()
            seen = 0
            async for message in ws:
                frame = json.loads(message.data)
                if frame.get("type") == "progress":
                    arrivals[frame["step"] - 1].append(time.perf_counter())
                    seen += 1
                    if seen == events:
                        break
        finished += 1
        if finished == sockets:
            done.set()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        tasks = [asyncio.create_task(subscriber(http)) for _ in range(sockets)]
        await asyncio.wait_for(subscribed.wait(), 120)
        # Every relay is reading the stream before the first event.
        await asyncio.sleep(1.0)
        client = redis.asyncio.Redis.from_url(redis_url)
        sent: list[float] = []
        for step in range(1, events + 1):
            sent.append(time.perf_counter())
            await append_event(
                client, generation.id, ProgressEvent(step=step, total=events)
            )
            # Node-like pacing: an event every 100 ms.
            await asyncio.sleep(0.1)
        await asyncio.wait_for(done.wait(), 120)
        await client.aclose()
        await asyncio.gather(*tasks)
    delays = [
        1000 * (arrival - sent[step])
        for step, times in enumerate(arrivals)
        for arrival in times
    ]
    return {
        "sockets": sockets,
        "events": events,
        "deliveries": len(delays),
        "p50_ms": statistics.median(delays),
        "p99_ms": percentile(delays, 0.99),
        "max_ms": max(delays),
    }


async def run_web(
    root: Path,
    database_url: str,
    redis_url: str,
    port: int,
    extra: dict[str, str],
    tree: Path = REPO,
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDAPI_")}
    # The tree's own code, whichever checkout the venv was installed from.
    env["PYTHONPATH"] = str(tree)
    env.update(
        {
            "SDAPI_DATABASE_URL": database_url,
            "SDAPI_REDIS_URL": redis_url,
            "SDAPI_SECRET_KEY": "bench-secret",
            "SDAPI_PORT": str(port),
            "SDAPI_DATA_DIR": str(root / "data"),
            "SDAPI_LOG_LEVEL": "WARNING",
            **extra,
        }
    )
    log = (root / f"web-{port}.log").open("wb")
    # Started once, before anything is measured: blocking is fine here.
    process = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "sdapi", "web"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tree,
    )
    await wait_ready(f"http://127.0.0.1:{port}/readyz")
    return process


WEB_SETTINGS = {"SDAPI_PREMIUM_MAX_IN_FLIGHT": "100000"}


def migrate_tree(tree: Path, database_url: str) -> None:
    """Bring `database_url` to `tree`'s schema with `tree`'s own migrations."""
    script = (
        "import asyncio, sys\n"
        "from sdapi.db.connection import apply_migrations\n"
        "asyncio.run(apply_migrations(sys.argv[1]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(
        [sys.executable, "-c", script, database_url], env=env, cwd=tree, check=True
    )


async def compare(
    seconds: float, trees: dict[str, Path], rounds: int
) -> dict[str, list[dict[str, Any]]]:
    """Alternate the submit load between one web per tree, `rounds` times."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        with contextlib.ExitStack() as stack:
            valkey = stack.enter_context(EmbeddedValkey(root / "valkey"))
            webs: dict[str, tuple[str, list[dict[str, str]], subprocess.Popen[bytes]]]
            webs = {}
            try:
                for index, (name, tree) in enumerate(trees.items()):
                    # A database per tree, migrated by the tree's own code:
                    # trees on either side of a migration cannot share one.
                    database_url = stack.enter_context(
                        embedded_postgres(root / "pg", database=f"bench{index}")
                    )
                    migrate_tree(tree, database_url)
                    port = free_port()
                    process = await run_web(
                        root, database_url, valkey.url, port, WEB_SETTINGS, tree
                    )
                    url = f"http://127.0.0.1:{port}/api/v1/generations"
                    webs[name] = (url, await make_users(database_url, USERS), process)
                for url, users, _ in webs.values():
                    await load(url, users, 2)  # warm-up
                for n in range(rounds):
                    for name, (url, users, _) in webs.items():
                        result = await load(url, users, seconds)
                        result["load_avg"] = os.getloadavg()[0]
                        results[name].append(result)
                        report(f"round {n + 1} {name}", result)
            finally:
                for _, _, process in webs.values():
                    process.terminate()
                    process.wait()
    for name, runs in results.items():
        rates = sorted(run["rps"] for run in runs)
        p99s = sorted(run["p99_ms"] for run in runs)
        print(
            f"{name}: median {statistics.median(rates):.0f} req/s "
            f"(range {rates[0]:.0f}-{rates[-1]:.0f}), median p99 "
            f"{statistics.median(p99s):.1f} ms over {len(runs)} runs"
        )
    return results


async def main(seconds: float, sockets: int, events: int) -> None:
    print(machine())
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        with (
            embedded_postgres(root / "pg", database="bench") as database_url,
            EmbeddedValkey(root / "valkey") as valkey,
        ):
            await apply_migrations(database_url)
            port = free_port()
            web = await run_web(
                root,
                database_url,
                valkey.url,
                port,
                {
                    **WEB_SETTINGS,
                    "SDAPI_WS_MAX_SOCKETS_PER_USER": str(sockets),
                    "SDAPI_WS_MAX_RELAYS": "64",
                    # Every socket comes from this one address.
                    "SDAPI_MAX_CONNECTIONS_PER_CLIENT": "0",
                },
            )
            minimal_port = free_port()
            minimal = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-c", MINIMAL_SERVER, str(minimal_port)]
            )
            try:
                await wait_ready(f"http://127.0.0.1:{minimal_port}/healthz")
                users = await make_users(database_url, USERS)
                url = f"http://127.0.0.1:{port}/api/v1/generations"
                await load(url, users, 2)  # warm-up
                ours = await load(url, users, seconds)
                base = await load(
                    f"http://127.0.0.1:{minimal_port}/api/v1/generations",
                    users,
                    seconds,
                )
                report("submit (sdapi web)", ours)
                report("submit (minimal aiohttp handler)", base)
                print(f"ratio: {ours['rps'] / base['rps']:.2f}")
                spread = await fanout(
                    f"http://127.0.0.1:{port}",
                    valkey.url,
                    database_url,
                    sockets,
                    events,
                )
                report("WebSocket fan-out", spread)
            finally:
                minimal.terminate()
                web.terminate()
                web.wait()
                minimal.wait()


def report(name: str, result: dict[str, Any]) -> None:
    shown = ", ".join(
        f"{key} {value:.1f}" if isinstance(value, float) else f"{key} {value}"
        for key, value in result.items()
    )
    print(f"{name}: {shown}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--sockets", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument(
        "--trees",
        nargs="+",
        metavar="NAME=PATH",
        help="compare the submit load of these checkouts, alternately",
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.trees:
        print(machine())
        trees = {
            name: Path(path).resolve()
            for name, _, path in (tree.partition("=") for tree in args.trees)
        }
        asyncio.run(compare(args.seconds, trees, args.rounds))
    else:
        asyncio.run(main(args.seconds, args.sockets, args.events))

"""Soak: a steady mixed load on web, jobs and a tiny GPU node for ten minutes.

Premium submits, normal submits (emailed after a 5 s window), reads, and
WebSockets opening, following a run and closing, all at once. Reports each
process's memory over time (it must stay flat), the errors (none), that
every generation finished, and that every normal one was emailed once.

    .venv/bin/python bench/soak.py [--seconds 600]
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from bench.pipeline import machine  # noqa: E402
from sdapi.db.connection import apply_migrations, open_database  # noqa: E402
from sdapi.devtools.embedded import EmbeddedValkey, embedded_postgres  # noqa: E402
from sdapi.devtools.mailsink import free_port, mail_sink, read_messages  # noqa: E402

SMALL = {"prompt": "a soak test", "width": 64, "height": 64, "steps": 4}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start(name: str, env: dict[str, str], root: Path) -> subprocess.Popen[bytes]:
    log = (root / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "sdapi", name],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def users(database_url: str) -> tuple[dict[str, str], dict[str, str]]:
    from sdapi.devtools.accounts import make_user

    async with open_database(database_url, pool_size=1):
        premium = await make_user(premium=True)
        normal = await make_user(premium=False)
    return premium.headers, normal.headers


async def main(seconds: float) -> None:
    print(machine())
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        mail = root / "mail"
        with (
            embedded_postgres(root / "pg", database="soak") as database_url,
            EmbeddedValkey(root / "valkey") as valkey,
            mail_sink(mail) as smtp_url,
        ):
            await apply_migrations(database_url)
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            env = {k: v for k, v in os.environ.items() if not k.startswith("SDAPI_")}
            env.update(
                SDAPI_DATABASE_URL=database_url,
                SDAPI_REDIS_URL=valkey.url,
                SDAPI_SECRET_KEY="soak-secret",  # noqa: S106 (a throwaway stack)
                SDAPI_SMTP_URL=smtp_url,
                SDAPI_PUBLIC_URL=base,
                SDAPI_PORT=str(port),
                SDAPI_DATA_DIR=str(root / "data"),
                SDAPI_MODEL_DIR=str(root / "models"),
                SDAPI_NORMAL_DELAY="5",
                SDAPI_PREMIUM_MAX_IN_FLIGHT="50",
                SDAPI_PREMIUM_IMAGES_PER_DAY="100000",
                SDAPI_NORMAL_IMAGES_PER_DAY="100000",
                SDAPI_LOG_LEVEL="WARNING",
                SDAPI_GPU_DEVICE="cpu",
            )
            processes = {
                name: start(name, env, root) for name in ("web", "jobs", "gpu-node")
            }
            errors: Counter[str] = Counter()
            submitted: dict[str, str] = {}
            memory: list[tuple[float, dict[str, float]]] = []
            try:
                async with aiohttp.ClientSession(base_url=base) as http:
                    deadline = time.monotonic() + 120
                    while True:
                        try:
                            async with http.get("/readyz") as response:
                                if response.status == 200:
                                    break
                        except aiohttp.ClientError:
                            pass
                        if time.monotonic() > deadline:
                            raise SystemExit("web did not start")
                        await asyncio.sleep(0.2)
                    premium, normal = await users(database_url)
                    stop_at = time.monotonic() + seconds

                    async def submitter(
                        headers: dict[str, str], tier: str, every: float
                    ) -> None:
                        while time.monotonic() < stop_at:
                            body = {**SMALL, "seed": random.randrange(2**32)}
                            async with http.post(
                                "/api/v1/generations", json=body, headers=headers
                            ) as r:
                                if r.status == 202:
                                    submitted[(await r.json())["id"]] = tier
                                elif r.status != 503:  # no node announced yet
                                    errors[f"submit {r.status}"] += 1
                            await asyncio.sleep(every)

                    async def reader() -> None:
                        paths = [
                            "/api/v1/me",
                            "/api/v1/generations?limit=10",
                            "/api/v1/status",
                            "/api/v1/models",
                        ]
                        while time.monotonic() < stop_at:
                            for path in paths:
                                async with http.get(path, headers=premium) as r:
                                    await r.read()
                                    if r.status != 200:
                                        errors[f"GET {path} {r.status}"] += 1
                            await asyncio.sleep(0.5)

                    async def socket_user() -> None:
                        while time.monotonic() < stop_at:
                            async with http.ws_connect(
                                "/api/v1/ws", headers=premium
                            ) as ws:
                                await ws.send_json(
                                    {
                                        "type": "generate",
                                        "request": {
                                            **SMALL,
                                            "seed": random.randrange(2**32),
                                        },
                                    }
                                )
                                async for message in ws:
                                    frame = message.json()
                                    if frame["type"] == "accepted":
                                        submitted[frame["id"]] = "premium"
                                    if frame["type"] == "error":
                                        errors[f"ws {frame['code']}"] += 1
                                        break
                                    if frame["type"] == "done":
                                        break

                    async def sampler() -> None:
                        started = time.monotonic()
                        while time.monotonic() < stop_at:
                            memory.append(
                                (
                                    time.monotonic() - started,
                                    {n: rss_mib(p.pid) for n, p in processes.items()},
                                )
                            )
                            await asyncio.sleep(30)

                    await asyncio.gather(
                        submitter(premium, "premium", 1.0),
                        submitter(normal, "normal", 2.0),
                        reader(),
                        socket_user(),
                        socket_user(),
                        sampler(),
                    )
                    # Everything submitted finishes.
                    from sdapi.db.models import Generation

                    async with open_database(database_url, pool_size=1):
                        wait_until = time.monotonic() + 180
                        while True:
                            rows = await Generation.filter(
                                id__in=list(submitted)
                            ).values("id", "status")
                            statuses = Counter(row["status"] for row in rows)
                            if statuses.keys() <= {"succeeded", "failed", "cancelled"}:
                                break
                            if time.monotonic() > wait_until:
                                break
                            await asyncio.sleep(1)
                    normal_ids = {
                        gid for gid, tier in submitted.items() if tier == "normal"
                    }
                    wait_until = time.monotonic() + 120
                    while True:
                        mails = [
                            email.message_from_bytes(raw, policy=email.policy.default)
                            for raw in read_messages(mail)
                        ]
                        emailed = Counter(
                            gid for m in mails for gid in normal_ids if gid in str(m)
                        )
                        if set(emailed) >= normal_ids or time.monotonic() > wait_until:
                            break
                        await asyncio.sleep(1)
            finally:
                for process in processes.values():
                    process.terminate()
                for process in processes.values():
                    process.wait()
    tiers = dict(Counter(submitted.values()))
    print(f"generations: {len(submitted)} {tiers}, {dict(statuses)}")
    copies = sum(1 for count in emailed.values() if count > 1)
    print(f"normal emailed: {len(emailed)} of {len(normal_ids)}, copies > 1: {copies}")
    print(f"errors: {dict(errors) or 'none'}")
    print("memory (MiB RSS) over time:")
    for at, sample in memory:
        print(
            f"  {at:5.0f} s  " + "  ".join(f"{n} {v:6.1f}" for n, v in sample.items())
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=600)
    args = parser.parse_args()
    asyncio.run(main(args.seconds))

"""Image downloads from each image store through web, and the database's size.

Starts embedded PostgreSQL and Valkey, moto's S3 server (tests/s3_server.py)
and, per store, one `sdapi web` with that SDAPI_STORAGE_URL. For each store
the same images are seeded as `jobs` stores results (ImageStores.write, then
the GeneratedImage row), then downloaded through web's route
GET /api/v1/generations/{id}/images/{i} by concurrent clients with the
owner's token:

  postgres      bytes in the database (table image_blobs: today's layout,
                bytea rows), streamed by web
  file          a folder, streamed by web
  s3            moto, streamed by web
  s3-redirect   moto, SDAPI_STORAGE_REDIRECT=true: web answers 302 to a
                presigned URL and the client follows it to moto

Throughput is images/s and MB/s over one pass of every image in a shuffled
order; latency is per image, from the request to the last byte (redirects
included). The database size is pg_total_relation_size of the image tables
after seeding: bytes in rows (postgres) against metadata only (S3).

The PNGs are 1024x1024 (SDXL-sized, about 1.5 MB: the size the issue plans
for), noise over smooth colour so that they compress as photos do, not as
flat test patterns; `--distinct` of them are made and stored round-robin,
each under its own key.

    .venv/bin/python bench/storage.py [--images 1000] [--px 1024] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tortoise import connections  # noqa: E402

from bench.pipeline import machine  # noqa: E402
from bench.web_load import percentile, report, run_web  # noqa: E402
from sdapi.db.connection import apply_migrations, open_database  # noqa: E402
from sdapi.db.image_store import ImageStores  # noqa: E402
from sdapi.db.models import GeneratedImage, Generation  # noqa: E402
from sdapi.devtools.accounts import make_user  # noqa: E402
from sdapi.devtools.embedded import EmbeddedValkey, embedded_postgres  # noqa: E402
from sdapi.devtools.net import free_port  # noqa: E402
from sdapi.infra.object_store import result_object_key  # noqa: E402
from tests.s3_server import S3_ENV, MotoServer  # noqa: E402

STORES = ("postgres", "file", "s3", "s3-redirect")
PER_GENERATION = 4
# The tables that hold images or exist because of them.
IMAGE_TABLES = ("generated_images", "image_blobs", "storage_deletions")


def make_pngs(count: int, px: int) -> list[bytes]:
    """`count` distinct photo-like PNGs of px x px."""
    rng = np.random.default_rng(2026)
    found = []
    for _ in range(count):
        low = rng.integers(0, 256, (px // 32, px // 32, 3), dtype=np.uint8)
        smooth = Image.fromarray(low).resize((px, px), Image.Resampling.BICUBIC)
        noisy = np.asarray(smooth, dtype=np.float32) + rng.normal(0, 2, (px, px, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "PNG")
        found.append(buffer.getvalue())
    return found


async def seed(
    database_url: str, store_url: str, pngs: Sequence[bytes], images: int
) -> tuple[dict[str, str], list[str], float]:
    """Store `images` images as jobs does; their owner's headers, their paths
    and the seconds the writes took."""
    async with open_database(database_url, pool_size=8):
        owner = await make_user(premium=True)
        stores = ImageStores(store_url, timeout_s=60)
        paths: list[str] = []
        gate = asyncio.Semaphore(8)

        async def one_generation(first: int) -> None:
            count = min(PER_GENERATION, images - first)
            generation = await Generation.create(
                id=uuid.uuid4(),
                user=owner.user,
                tier="premium",
                status="succeeded",
                delivery="download",
                model="tiny",
                request={"prompt": "bench", "model": "tiny", "seed": first},
                width=1024,
                height=1024,
                steps=25,
                guidance_scale=7.5,
                scheduler="euler",
                num_images=count,
                attempts=1,
            )
            async with gate:
                for index in range(count):
                    data = pngs[(first + index) % len(pngs)]
                    stored = await stores.write(
                        result_object_key(generation.id, index), data
                    )
                    await GeneratedImage.create(
                        id=uuid.uuid4(),
                        generation=generation,
                        index=index,
                        seed=first + index,
                        width=1024,
                        height=1024,
                        sha256=hashlib.sha256(data).hexdigest(),
                        store=stored.store,
                        object_key=stored.object_key,
                        size=stored.size,
                    )
                    paths.append(f"/api/v1/generations/{generation.id}/images/{index}")

        started = time.monotonic()
        try:
            await asyncio.gather(
                *(one_generation(n) for n in range(0, images, PER_GENERATION))
            )
        finally:
            await stores.close()
        return owner.headers, paths, time.monotonic() - started


async def table_sizes(database_url: str) -> dict[str, int]:
    async with open_database(database_url, pool_size=1):
        db = connections.get("default")
        await db.execute_script("ANALYZE")
        rows = await db.execute_query_dict(
            "SELECT relname AS name, pg_total_relation_size(oid) AS bytes "
            "FROM pg_class WHERE relname = ANY($1::text[])",
            [list(IMAGE_TABLES)],
        )
        return {row["name"]: int(row["bytes"]) for row in rows}


async def reset(database_url: str) -> None:
    """Empty the image tables (TRUNCATE frees their space at once)."""
    async with open_database(database_url, pool_size=1):
        await connections.get("default").execute_script(
            "TRUNCATE generations, generated_images, image_blobs, "
            "storage_deletions CASCADE"
        )


async def download(
    base_url: str,
    paths: Sequence[str],
    headers: dict[str, str],
    clients: int,
    expected: int,
) -> dict[str, Any]:
    """Every path once by `clients` concurrent clients: rate and latency."""
    order = list(paths)
    random.Random(7).shuffle(order)
    latencies: list[float] = []
    errors: dict[int, int] = {}
    received = 0
    redirected = 0

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal received, redirected
        while order:
            path = order.pop()
            started = time.perf_counter()
            async with http.get(base_url + path, headers=headers) as answer:
                body = await answer.read()
                if answer.status != 200:
                    errors[answer.status] = errors.get(answer.status, 0) + 1
                    continue
                redirected += bool(answer.history)
            latencies.append(time.perf_counter() - started)
            received += len(body)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        took = time.monotonic() - started
    if len(latencies) != expected:
        raise SystemExit(f"{len(latencies)} of {expected} downloads: {errors}")
    return {
        "images_per_s": len(latencies) / took,
        "MB_per_s": received / took / 1e6,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "redirected": redirected,
        "errors": errors,
    }


def store_url(kind: str, root: Path, moto: MotoServer) -> str:
    if kind == "postgres":
        return "postgres"
    if kind == "file":
        return f"file://{root / 'images'}"
    return moto.store_url(moto.new_bucket())


async def main(images: int, px: int, clients: int, distinct: int) -> None:
    print(machine())
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    pngs = await asyncio.to_thread(make_pngs, distinct, px)
    mean_kb = statistics.mean(len(p) for p in pngs) / 1024
    print(f"{images} images, {distinct} distinct {px}x{px} PNGs of {mean_kb:.0f} KiB")
    os.environ.update(S3_ENV)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        moto = MotoServer(root)
        moto.start()
        try:
            with (
                embedded_postgres(root / "pg", database="bench") as database_url,
                EmbeddedValkey(root / "valkey") as valkey,
            ):
                await apply_migrations(database_url)
                for kind in STORES:
                    await reset(database_url)
                    url = store_url(kind, root, moto)
                    headers, paths, wrote_s = await seed(
                        database_url, url, pngs, images
                    )
                    sizes = await table_sizes(database_url)
                    total = sum(sizes.values())
                    shown = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items())
                    print(
                        f"database ({kind}): {total / 1e6 * 1000 / images:.1f} MB "
                        f"per 1,000 images ({shown}); seeding took {wrote_s:.1f} s"
                    )
                    port = free_port()
                    web = await run_web(
                        root,
                        database_url,
                        valkey.url,
                        port,
                        {
                            "SDAPI_STORAGE_URL": url,
                            "SDAPI_STORAGE_REDIRECT": str(kind == "s3-redirect"),
                            "SDAPI_MAX_CONNECTIONS_PER_CLIENT": "0",
                        },
                    )
                    try:
                        base = f"http://127.0.0.1:{port}"
                        # Warm-up: connections, the first queries, the store.
                        warm = paths[:50]
                        await download(base, warm, headers, clients, len(warm))
                        result = await download(base, paths, headers, clients, images)
                    finally:
                        web.terminate()
                        await asyncio.to_thread(web.wait)
                    report(f"download ({kind}, {clients} clients)", result)
        finally:
            moto.stop()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--px", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--distinct", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.images, args.px, args.clients, args.distinct))

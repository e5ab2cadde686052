"""A stalled Redis or PostgreSQL (SIGSTOP) is a quick 503, and nothing hangs.

Each test freezes a server of its own, so the rest of the suite never waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.exceptions import TimeoutError as RedisTimeoutError

from sdapi.contract.status import Status
from sdapi.db.connection import apply_migrations, open_database
from sdapi.db.models import Generation
from sdapi.devtools.accounts import auth, make_user
from sdapi.devtools.embedded import EmbeddedValkey, embedded_postgres
from sdapi.devtools.net import free_port
from sdapi.infra.queue import create_queue_pool
from tests.consul_double import ConsulDouble
from tests.node_double import NodeDouble, jobs_context
from tests.support import until
from tests.web.test_consul import register_node
from web.app import create_app
from web.appkeys import registry_key
from web.settings import WebSettings

DEADLINE_S = 1.0
# What a request may take past its dependency's deadline (seconds): the
# answer is quick, not instant, on a busy machine.
SLACK_S = 2.5
SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}


@contextlib.contextmanager
def frozen(pids: list[int]) -> Iterator[None]:
    """SIGSTOP the processes for the block: alive, holding every connection,
    answering nothing (a stalled server, not a dead one)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def postgres_pids(pgdata: Path) -> list[int]:
    """The postmaster of `pgdata` and its backends."""
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                pids.append(int(entry.name))
    return pids


async def timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    response = await call
    return response, time.monotonic() - started


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey(tmp_path / "valkey") as server:
        yield server


async def test_a_frozen_redis_is_a_quick_503_and_nothing_is_written(
    aiohttp_client: Any, web_settings: WebSettings, own_valkey: EmbeddedValkey
) -> None:
    settings = web_settings.model_copy(
        update={"redis_url": own_valkey.url, "redis_timeout": DEADLINE_S}
    )
    client: TestClient = await aiohttp_client(create_app(settings))
    assert settings.database_url
    async with jobs_context(own_valkey.url, settings.database_url) as ctx:
        await NodeDouble(ctx).announce()
        _, secret = await make_user()
        assert own_valkey.pid is not None
        with frozen([own_valkey.pid]):
            submit, took = await timed(
                client.post("/api/v1/generations", json=SMALL, headers=auth(secret))
            )
            assert submit.status == 503 and took < DEADLINE_S + SLACK_S
            assert int(submit.headers["Retry-After"]) > 0
            assert (await submit.json())["error"]["code"] == "unavailable"
            signin, took = await timed(
                client.post(
                    "/api/v1/auth/signin",
                    json={"email": "a@example.org", "password": "whatever it is"},
                )
            )
            assert signin.status == 503 and took < DEADLINE_S + SLACK_S
            ready, took = await timed(client.get("/readyz"))
            assert ready.status == 503 and took < 2.0 + SLACK_S
            assert (await ready.json())["redis"] is False
        assert await Generation.all().count() == 0  # nothing half-written
        # Redis answers again: so does everything else.
        ready = await client.get("/readyz")
        assert ready.status == 200
        again = await client.post(
            "/api/v1/generations", json=SMALL, headers=auth(secret)
        )
        assert again.status == 202


@pytest.fixture
async def own_postgres(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    with embedded_postgres(tmp_path / "pg", database="stalls") as url:
        await apply_migrations(url)
        yield url, tmp_path / "pg" / "postgres"


async def test_a_frozen_postgres_is_a_quick_503_and_readyz_answers_in_time(
    aiohttp_client: Any,
    web_settings: WebSettings,
    own_postgres: tuple[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, pgdata = own_postgres
    settings = web_settings.model_copy(
        update={"database_url": url, "db_timeout": DEADLINE_S}
    )
    client: TestClient = await aiohttp_client(create_app(settings))
    async with open_database(url):
        _, secret = await make_user()
    assert (await client.get("/api/v1/me", headers=auth(secret))).status == 200
    with frozen(postgres_pids(pgdata)):
        me, took = await timed(client.get("/api/v1/me", headers=auth(secret)))
        assert me.status == 503 and took < DEADLINE_S + SLACK_S
        assert int(me.headers["Retry-After"]) > 0
        for _ in range(3):
            ready, took = await timed(client.get("/readyz"))
            assert ready.status == 503 and took < 2.0 + SLACK_S
            assert (await ready.json())["database"] is False
    # One line for the change of state, not a traceback per probe.
    lines = [r for r in caplog.records if "readiness: database" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None

    async def recovered() -> bool:
        return (await client.get("/readyz")).status == 200

    await until(recovered, 10, "a ready app again", every=0.1)
    me = await client.get("/api/v1/me", headers=auth(secret))
    assert me.status == 200


# --- finding 7: one Redis budget per request, not one per command ----------


async def test_a_frozen_redis_costs_a_listing_one_budget(
    aiohttp_client: Any, web_settings: WebSettings, own_valkey: EmbeddedValkey
) -> None:
    settings = web_settings.model_copy(
        update={
            "redis_url": own_valkey.url,
            "redis_timeout": DEADLINE_S,
            "premium_max_in_flight": 20,
        }
    )
    client: TestClient = await aiohttp_client(create_app(settings))
    assert settings.database_url and own_valkey.pid is not None
    async with jobs_context(own_valkey.url, settings.database_url) as ctx:
        await NodeDouble(ctx).announce()
        _, secret = await make_user()
        for _ in range(20):
            accepted = await client.post(
                "/api/v1/generations", json=SMALL, headers=auth(secret)
            )
            assert accepted.status == 202
        with frozen([own_valkey.pid]):
            listing, took = await timed(
                client.get("/api/v1/generations?limit=20", headers=auth(secret))
            )
            # Each item would ask Redis for its queue position: one budget for
            # them all, then PostgreSQL's view without the live details.
            assert listing.status == 200 and took < 2 * DEADLINE_S
            items = (await listing.json())["items"]
            assert len(items) == 20
            assert all(item["status"] == Status.QUEUED for item in items)
            assert all(item["queue_position"] is None for item in items)
            one, took = await timed(
                client.get(
                    f"/api/v1/generations/{items[0]['id']}", headers=auth(secret)
                )
            )
            assert one.status == 200 and took < 2 * DEADLINE_S
            assert (await one.json())["queue_position"] is None
        listing = await client.get("/api/v1/generations?limit=20", headers=auth(secret))
        positions = [item["queue_position"] for item in (await listing.json())["items"]]
        assert sorted(positions) == list(range(20))


async def test_a_frozen_redis_costs_an_accepted_submit_one_budget(
    aiohttp_client: Any,
    web_settings: WebSettings,
    own_valkey: EmbeddedValkey,
    consul: ConsulDouble,
) -> None:
    # With Consul (as deployed) the nodes are known without Redis: the submit
    # is stored, and only its enqueue and live details need Redis.
    port = free_port()
    settings = web_settings.model_copy(
        update={
            "redis_url": own_valkey.url,
            "redis_timeout": DEADLINE_S,
            "consul_url": consul.url,
            "port": port,
            "host": "127.0.0.1",
        }
    )
    client: TestClient = await aiohttp_client(
        create_app(settings), server_kwargs={"port": port}
    )
    _, secret = await make_user()
    await register_node(consul)
    client.app[registry_key].invalidate()
    models = await (await client.get("/api/v1/models", headers=auth(secret))).json()
    assert [m["available"] for m in models["items"] if m["id"] == "tiny"] == [True]
    assert own_valkey.pid is not None
    with frozen([own_valkey.pid]):
        submit, took = await timed(
            client.post("/api/v1/generations", json=SMALL, headers=auth(secret))
        )
        # Stored before the enqueue was tried: accepted, and the reconciler
        # enqueues it once its deadline passes.
        assert submit.status == 202 and took < 2 * DEADLINE_S
        body = await submit.json()
        assert body["status"] == Status.QUEUED and body["queue_position"] is None
    stored = await Generation.get(id=body["id"])
    assert stored.status == Status.QUEUED and stored.deadline is not None
    await client.close()  # while the Consul double still answers


async def test_a_write_to_a_frozen_redis_ends_at_the_deadline(
    own_valkey: EmbeddedValkey,
) -> None:
    # More than the socket buffers hold cannot be sent to a server that reads
    # nothing: the write itself is bounded (sdapi/infra/redis_writes.py).
    pool = await create_queue_pool(own_valkey.url, deadline_s=DEADLINE_S)
    try:
        await pool.ping()
        assert own_valkey.pid is not None
        with frozen([own_valkey.pid]):
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await pool.set("sdapi-test:big", b"x" * (64 << 20))
            took = time.monotonic() - started
        # The write times out, then the retry after a dropped connection
        # (its handshake unanswered): each one deadline.
        assert took < 2 * DEADLINE_S + SLACK_S
        assert await pool.set("sdapi-test:big", b"x") is True
    finally:
        await pool.aclose()

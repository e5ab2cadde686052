"""Estimated times in the API: `eta_s` and `eta` on generations and frames,
from the speeds nodes publish (here written as a node writes them)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from arq.constants import in_progress_key_prefix

from sdapi.contract.events import QueuedEvent
from sdapi.contract.names import (
    generation_job_id,
    premium_queue,
    progress_key,
    speed_key,
)
from sdapi.contract.speed import (
    LoadRecord,
    SpeedRecord,
    load_field,
    size_bucket,
    speed_field,
)
from sdapi.contract.status import Status
from sdapi.db.models import Generation, utcnow
from sdapi.devtools.accounts import auth, make_user
from sdapi.infra.queue import QueuePool
from sdapi.infra.streams import read_events
from tests.node_double import TINY, NodeDouble, node_info
from web.appkeys import redis_key

GENERATIONS = "/api/v1/generations"
# 4 steps of 0.1 s and 0.5 s outside them: 0.9 s a run at 64x64.
SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}
RUN_S = 0.9


async def learned(redis: QueuePool, node_id: str = TINY.node_id) -> None:
    """What a node that ran `tiny` at 64x64 publishes."""
    record = SpeedRecord(
        pixels=64 * 64, step_s=0.1, overhead_s=0.5, samples=5, at=time.time()
    )
    await redis.hset(
        speed_key("tiny"),
        speed_field(node_id, size_bucket(64, 64)),
        record.model_dump_json(),
    )


async def submit(client: TestClient, secret: str, **change: Any) -> dict[str, Any]:
    response = await client.post(
        GENERATIONS, json={**SMALL, **change}, headers=auth(secret)
    )
    assert response.status == 202, await response.text()
    view: dict[str, Any] = await response.json()
    return view


async def show(client: TestClient, secret: str, ident: str) -> dict[str, Any]:
    response = await client.get(f"{GENERATIONS}/{ident}", headers=auth(secret))
    assert response.status == 200
    view: dict[str, Any] = await response.json()
    return view


async def queued_event(redis: QueuePool, ident: str) -> QueuedEvent:
    events = [event for _, event in await read_events(redis, ident)]
    assert isinstance(events[0], QueuedEvent)
    return events[0]


async def test_nothing_learned_yet_is_said_as_null(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    view = await submit(client, secret)
    assert view["eta_s"] is None
    assert view["eta"] is None
    event = await queued_event(client.app[redis_key], view["id"])
    assert event.wait_s is None and event.run_s is None


async def test_a_queued_generation_waits_for_the_work_ranked_before_it(
    client: TestClient, node: NodeDouble
) -> None:
    redis = client.app[redis_key]
    await learned(redis)
    _, secret = await make_user()
    first = await submit(client, secret)
    assert first["eta"] == {"wait_s": 0.0, "run_s": RUN_S}
    assert first["eta_s"] == RUN_S
    second = await submit(client, secret, num_images=2)
    third = await submit(client, secret)
    # At submit: its `queued` event and its 202 agree.
    assert third["queue_position"] == 2
    assert third["eta"] == {"wait_s": pytest.approx(3 * RUN_S), "run_s": RUN_S}
    event = await queued_event(redis, third["id"])
    assert (event.wait_s, event.run_s) == (pytest.approx(3 * RUN_S), RUN_S)
    # The first runs (arq keeps it in the queue), half done by its progress.
    job_id = generation_job_id(first["id"])
    await redis.set(in_progress_key_prefix + job_id, b"1", ex=60)
    await redis.hset(progress_key(first["id"]), mapping={"step": 2, "total": 4})
    view = await show(client, secret, third["id"])
    assert view["eta"] == {
        "wait_s": pytest.approx(0.45 + 2 * RUN_S, abs=0.06),
        "run_s": RUN_S,
    }
    assert view["eta_s"] == pytest.approx(0.45 + 3 * RUN_S, abs=0.11)
    # Rank order, not arrival: the third served before the second (as a fair
    # share may order them) waits for the first only. Their scores swap,
    # whatever a score means.
    queue = premium_queue("tiny")
    ids = [generation_job_id(view["id"]) for view in (second, third)]
    scores = [await redis.zscore(queue, job_id) for job_id in ids]
    await redis.zadd(queue, {ids[0]: scores[1], ids[1]: scores[0]})
    view = await show(client, secret, third["id"])
    assert view["queue_position"] == 1
    assert view["eta"]["wait_s"] == pytest.approx(0.45, abs=0.06)
    assert (await show(client, secret, second["id"]))["queue_position"] == 2


async def test_a_websocket_generate_is_accepted_with_its_queued_place_and_eta(
    client: TestClient, node: NodeDouble
) -> None:
    redis = client.app[redis_key]
    await learned(redis)
    _, secret = await make_user()
    await submit(client, secret)
    await submit(client, secret, num_images=2)
    async with client.ws_connect("/api/v1/ws", headers=auth(secret)) as ws:
        await ws.send_json({"type": "generate", "request": SMALL})
        accepted = await ws.receive_json(timeout=15)
    assert accepted["type"] == "accepted", accepted
    # The frame and the `queued` event say the same, as a 202 and its event.
    view = accepted["generation"]
    assert view["queue_position"] == 2
    assert view["eta"] == {"wait_s": pytest.approx(3 * RUN_S), "run_s": RUN_S}
    assert view["eta_s"] == pytest.approx(4 * RUN_S)
    event = await queued_event(redis, accepted["id"])
    assert event.position == 2
    assert (event.wait_s, event.run_s) == (pytest.approx(3 * RUN_S), RUN_S)


async def test_a_cold_model_waits_for_its_load(
    client: TestClient, node: NodeDouble
) -> None:
    redis = client.app[redis_key]
    # The same node, announced again before web has read the nodes: the model
    # is on its disk only.
    await NodeDouble(node.ctx, node_info(loaded=False)).announce()
    await learned(redis)
    _, secret = await make_user()
    # Loaded nowhere, load time never measured: no honest estimate.
    assert (await submit(client, secret))["eta_s"] is None
    await redis.hset(
        speed_key("tiny"),
        load_field(TINY.node_id),
        LoadRecord(load_s=6.0, samples=1, at=time.time()).model_dump_json(),
    )
    view = await submit(client, secret)
    assert view["eta"] == {"wait_s": pytest.approx(6.0 + RUN_S), "run_s": RUN_S}


async def test_running_blends_its_own_rate_and_keeps_waiting_apart(
    client: TestClient, node: NodeDouble
) -> None:
    redis = client.app[redis_key]
    await learned(redis)
    _, secret = await make_user()
    view = await submit(client, secret, steps=20)
    job = await node.claim()
    await node.start(job)
    # Its node measured 10 of 20 steps in 3 s: 3 s left at its own rate,
    # 1.25 s by the learned one (2.5 s a run); half done, half each.
    now = time.time()
    await redis.hset(
        progress_key(view["id"]),
        mapping={"step": 10, "total": 20, "t0": now - 3.0, "at": now},
    )
    shown = await show(client, secret, view["id"])
    assert shown["status"] == "running"
    assert shown["eta"] == {
        "wait_s": 0.0,
        "run_s": pytest.approx(0.5 * 3.0 + 0.5 * 1.25, abs=0.06),
    }
    await node.run(job)
    done = await show(client, secret, view["id"])
    assert done["status"] == "succeeded"
    assert done["eta_s"] is None and done["eta"] is None


async def test_a_scheduled_generation_waits_for_its_time_then_its_batch(
    client: TestClient, node: NodeDouble
) -> None:
    await learned(client.app[redis_key])
    _, secret = await make_user(premium=False)
    view = await submit(client, secret)
    assert view["status"] == "scheduled"
    row = await Generation.get(id=view["id"])
    assert row.scheduled_for is not None
    until_due = (row.scheduled_for - utcnow()).total_seconds()
    assert view["eta"]["run_s"] == RUN_S
    assert view["eta"]["wait_s"] == pytest.approx(until_due, abs=1.0)
    # Its time has passed and no batch took it yet: it waits no longer.
    await Generation.filter(id=view["id"]).update(
        scheduled_for=utcnow() - timedelta(seconds=5)
    )
    shown = await show(client, secret, view["id"])
    assert shown["status"] == Status.SCHEDULED
    assert shown["eta"] == {"wait_s": 0.0, "run_s": RUN_S}

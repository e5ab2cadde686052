"""Normal-tier requests over HTTP: verification, email delivery, limits, quota,
the `scheduled` row, cancelling it, and `GET /api/v1/status`."""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from jobs.dispatcher import dispatch_due
from jobs.resources import JobsResources
from jobs.settings import JobsSettings
from sdapi.contract.events import DoneEvent
from sdapi.contract.names import batch_queue, premium_queue
from sdapi.contract.status import Status
from sdapi.db.models import Generation, User, utcnow
from sdapi.devtools.accounts import auth, make_user
from sdapi.infra.announcements import announce_node
from sdapi.infra.registry import NodeRegistry
from sdapi.infra.streams import read_events
from tests.node_double import node_info
from web.appkeys import redis_key, stores_key
from web.settings import WebSettings

DELAY_S = 120
PER_DAY = 6


@pytest.fixture
def web_settings(web_settings: WebSettings) -> WebSettings:
    """A short normal-tier delay and a small daily quota."""
    return web_settings.model_copy(
        update={"normal_delay": DELAY_S, "normal_images_per_day": PER_DAY}
    )


async def bearer(
    *, verified: bool = True, premium: bool = False
) -> tuple[User, dict[str, str]]:
    """A user stored directly, and the Authorization header of a fresh token."""
    user, secret = await make_user(premium=premium, verified=verified)
    return user, auth(secret)


async def announce_tiny(client: TestClient, max_batch: int = 4) -> None:
    """A healthy `tiny` node, announced as a node without Consul does it."""
    info = node_info(
        node_id="node-a",
        max_batch=max_batch,
        max_width=512,
        max_height=512,
        schedulers=["euler", "ddim"],
    )
    redis = client.app[redis_key]
    await announce_node(redis, info)


def body(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a red fox in snow", "width": 64, "height": 64, **fields}


async def test_a_normal_request_is_scheduled_and_nothing_goes_to_redis(
    client: TestClient,
) -> None:
    _, auth = await bearer()
    before = utcnow()
    response = await client.post(
        "/api/v1/generations", json=body(steps=3, seed=42), headers=auth
    )
    assert response.status == 202, await response.text()
    data = await response.json()
    assert data["status"] == "scheduled"
    assert data["tier"] == "normal"
    assert data["delivery"] == "email"
    assert data["request"]["seed"] == 42
    assert data["queue_position"] is None
    scheduled_for = datetime.fromisoformat(data["scheduled_for"])
    assert (
        before + timedelta(seconds=DELAY_S)
        <= scheduled_for
        <= utcnow() + timedelta(seconds=DELAY_S)
    )
    row = await Generation.get(id=data["id"])
    assert (row.status, row.attempts, row.batch_id) == (Status.SCHEDULED, 0, None)
    assert row.queued_at is None and row.deadline is None
    assert (row.steps, row.num_images, row.width) == (3, 1, 64)
    # Nothing in Redis until the dispatcher's time: no job, no event.
    redis = client.app[redis_key]
    assert await redis.keys("arq:*") == []
    assert await read_events(redis, row.id) == []
    assert await redis.zcard(batch_queue("tiny")) == 0

    shown = await client.get(f"/api/v1/generations/{row.id}", headers=auth)
    assert (await shown.json())["status"] == "scheduled"


async def test_an_unverified_email_is_refused(client: TestClient) -> None:
    _, auth = await bearer(verified=False)
    for request in (body(), body(width=4096)):
        response = await client.post("/api/v1/generations", json=request, headers=auth)
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "email_not_verified"
    assert await Generation.all().count() == 0


async def test_normal_delivery_is_email_only(client: TestClient) -> None:
    _, auth = await bearer()
    response = await client.post(
        "/api/v1/generations", json=body(delivery="download"), headers=auth
    )
    assert response.status == 422
    details = (await response.json())["error"]["details"]
    assert [d["field"] for d in details] == ["delivery"]
    ok = await client.post(
        "/api/v1/generations", json=body(delivery="email"), headers=auth
    )
    assert ok.status == 202


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"width": 1024}, "width"),
        ({"height": 520}, "height"),
        ({"steps": 51}, "steps"),
        ({"num_images": 5}, "num_images"),
    ],
)
async def test_normal_tier_limits(
    client: TestClient, fields: dict[str, int], field: str
) -> None:
    _, auth = await bearer()
    response = await client.post(
        "/api/v1/generations", json=body(**fields), headers=auth
    )
    assert response.status == 422
    details = (await response.json())["error"]["details"]
    assert field in [d["field"] for d in details]


async def test_the_daily_quota_counts_images(client: TestClient) -> None:
    _, auth = await bearer()
    first = await client.post(
        "/api/v1/generations", json=body(num_images=4), headers=auth
    )
    assert first.status == 202
    over = await client.post(
        "/api/v1/generations", json=body(num_images=3), headers=auth
    )
    assert over.status == 429
    assert (await over.json())["error"]["code"] == "quota_exceeded"
    retry_after = int(over.headers["Retry-After"])
    assert 0 < retry_after <= 24 * 3600 + 1
    last = await client.post(
        "/api/v1/generations", json=body(num_images=2), headers=auth
    )
    assert last.status == 202
    assert await Generation.all().count() == 2


async def test_cancelling_a_scheduled_request_takes_it_out_of_its_window(
    client: TestClient, web_settings: WebSettings
) -> None:
    _, auth = await bearer()
    response = await client.post("/api/v1/generations", json=body(), headers=auth)
    generation_id = (await response.json())["id"]
    # Due now, and a node is up: only the cancel keeps it from the dispatcher.
    await Generation.filter(id=generation_id).update(scheduled_for=utcnow())
    await announce_tiny(client)

    deleted = await client.delete(f"/api/v1/generations/{generation_id}", headers=auth)
    assert deleted.status == 204
    shown = await (
        await client.get(f"/api/v1/generations/{generation_id}", headers=auth)
    ).json()
    assert shown["status"] == "cancelled"
    assert shown["finished_at"] is not None
    redis = client.app[redis_key]
    events = [event for _, event in await read_events(redis, generation_id)]
    assert events == [DoneEvent(status=Status.CANCELLED)]

    settings = JobsSettings(
        database_url=web_settings.database_url,
        redis_url=web_settings.redis_url,
        secret_key=SecretStr("test-secret-key"),
    )
    jobs = JobsResources(
        settings=settings,
        redis=redis,
        registry=NodeRegistry(redis, cache_s=0),
        stack=contextlib.AsyncExitStack(),
        stores=client.app[stores_key],
    )
    assert await dispatch_due(jobs) == 0
    assert await redis.zcard(batch_queue("tiny")) == 0
    assert (await Generation.get(id=generation_id)).status is Status.CANCELLED


async def test_status_needs_a_user(client: TestClient) -> None:
    response = await client.get("/api/v1/status")
    assert response.status == 401


async def test_status_shows_queues_per_tier_and_model(client: TestClient) -> None:
    await announce_tiny(client, max_batch=3)
    _, normal = await bearer()
    _, premium = await bearer(premium=True)
    for _ in range(2):
        await client.post("/api/v1/generations", json=body(), headers=normal)
    accepted = await client.post("/api/v1/generations", json=body(), headers=premium)
    assert (await accepted.json())["status"] == "queued"
    # One normal request is due (its delay is over).
    first = await Generation.filter(tier="normal").order_by("created_at").first()
    assert first is not None
    await Generation.filter(id=first.id).update(scheduled_for=utcnow())

    response = await client.get("/api/v1/status", headers=normal)
    assert response.status == 200
    data = await response.json()
    assert data["healthy_nodes"] == 1
    assert data["scheduled"] == 2
    assert data["scheduled_due"] == 1
    [tiny] = data["models"]
    assert tiny["model"] == "tiny"
    assert (tiny["available"], tiny["nodes"], tiny["max_batch"]) == (True, 1, 3)
    assert tiny["premium"] == {
        "jobs": 1,
        "generations": {"scheduled": 0, "queued": 1, "running": 0},
    }
    assert tiny["normal"] == {
        "jobs": 0,
        "generations": {"scheduled": 2, "queued": 0, "running": 0},
    }
    redis = client.app[redis_key]
    assert await redis.zcard(premium_queue("tiny")) == 1


async def test_status_is_in_the_openapi_document(client: TestClient) -> None:
    document = await (await client.get("/openapi.json")).json()
    assert "/api/v1/status" in document["paths"]
    assert "ServiceStatus" in document["components"]["schemas"]

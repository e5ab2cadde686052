"""REST generations: submit, list, show, download, cancel; limits and bad input."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from PIL import Image
from redis.exceptions import ConnectionError as RedisConnectionError

from sdapi.contract.events import QueuedEvent
from sdapi.contract.names import cancel_key, premium_queue
from sdapi.contract.status import Status
from sdapi.db.models import Generation
from sdapi.devtools.accounts import auth, make_user
from sdapi.infra.links import image_path, link_is_valid, signed_image_url
from sdapi.infra.registry import NodeRegistry
from sdapi.infra.streams import read_events
from tests.node_double import TINY, NodeDouble, jobs_context
from web.appkeys import redis_key
from web.settings import WebSettings

GENERATIONS = "/api/v1/generations"
SMALL = {"prompt": "a red fox", "width": 64, "height": 64, "steps": 4}


async def submit(
    client: TestClient, secret: str, body: dict[str, Any], status: int = 202
) -> dict[str, Any]:
    response = await client.post(GENERATIONS, json=body, headers=auth(secret))
    data: dict[str, Any] = await response.json()
    assert response.status == status, data
    return data


async def test_premium_submit_is_queued_with_the_generation_id_as_job_id(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    response = await client.post(GENERATIONS, json=SMALL, headers=auth(secret))
    assert response.status == 202
    body = await response.json()
    assert response.headers["Location"] == f"{GENERATIONS}/{body['id']}"
    assert body["status"] == "queued"
    assert body["tier"] == "premium"
    assert body["queue_position"] == 0
    assert body["delivery"] == "download"
    request = body["request"]
    # The model's defaults fill what the client left out; the seed is chosen.
    assert request["guidance_scale"] == 5.0
    assert request["scheduler"] == "euler"
    assert request["model"] == "tiny"
    assert 0 <= request["seed"] < 2**32
    job = await node.claim()
    assert str(job.generation_id) == body["id"]
    assert job.params.seed == request["seed"]
    events = await read_events(node.redis, body["id"])
    assert [event.type for _, event in events] == ["queued"]


async def test_prompt_syntax_defaults_to_a1111_and_reaches_the_node(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    default = await submit(client, secret, SMALL)
    plain = await submit(client, secret, {**SMALL, "prompt_syntax": "plain"})
    assert default["request"]["prompt_syntax"] == "a1111"
    assert plain["request"]["prompt_syntax"] == "plain"
    jobs = {str(j.generation_id): j for j in [await node.claim(), await node.claim()]}
    assert jobs[default["id"]].params.prompt_syntax == "a1111"
    assert jobs[plain["id"]].params.prompt_syntax == "plain"


async def test_size_defaults_to_512_and_steps_to_the_models(
    client: TestClient, node: NodeDouble
) -> None:
    big = TINY.model_copy(
        update={
            "node_id": "double-2",
            "model": "sd15",
            "max_width": 1024,
            "max_height": 1024,
            "default_steps": 25,
        }
    )
    await NodeDouble(node.ctx, big).announce()
    _, secret = await make_user()
    body = await submit(client, secret, {"prompt": "a fox", "model": "sd15"})
    assert (body["request"]["width"], body["request"]["height"]) == (512, 512)
    assert body["request"]["steps"] == 25
    # A model that cannot make 512 (the tiny one) uses its own default size.
    body = await submit(client, secret, {"prompt": "a fox", "model": "tiny"})
    assert (body["request"]["width"], body["request"]["height"]) == (64, 64)
    assert body["request"]["steps"] == 4


async def test_premium_work_waits_in_turns_by_user(
    client: TestClient, node: NodeDouble
) -> None:
    """Submits from two users are queued in fair order, not by arrival, and
    each answer and `queued` event tells the place it got."""
    _, heavy = await make_user()
    _, light = await make_user()
    h1, h2, h3 = [await submit(client, heavy, SMALL) for _ in range(3)]
    l1 = await submit(client, light, SMALL)
    order = await node.redis.zrange(premium_queue("tiny"), 0, -1)
    assert [job_id.decode() for job_id in order] == [
        h1["id"],
        l1["id"],
        h2["id"],
        h3["id"],
    ]
    assert [g["queue_position"] for g in (h1, h2, h3, l1)] == [0, 1, 2, 1]
    events = [event for _, event in await read_events(node.redis, l1["id"])]
    assert events == [QueuedEvent(position=1)]
    shown = await (
        await client.get(f"{GENERATIONS}/{h3['id']}", headers=auth(heavy))
    ).json()
    assert shown["queue_position"] == 3
    assert str((await node.claim()).generation_id) == h1["id"]
    assert str((await node.claim()).generation_id) == l1["id"]


async def test_queue_position_then_progress_then_images(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    first = await submit(client, secret, SMALL)
    second = await submit(client, secret, SMALL)
    assert second["queue_position"] == 1
    shown = await (
        await client.get(f"{GENERATIONS}/{second['id']}", headers=auth(secret))
    ).json()
    assert shown["queue_position"] == 1

    job = await node.claim()
    await node.start(job)
    await node.progress(job, 2)
    running = await (
        await client.get(f"{GENERATIONS}/{first['id']}", headers=auth(secret))
    ).json()
    assert running["status"] == "running"
    assert running["started_at"] is not None
    assert running["queue_position"] is None
    assert running["progress"] == {"step": 2, "total": 4}

    assert await node.run(job) == "succeeded"
    done = await (
        await client.get(f"{GENERATIONS}/{first['id']}", headers=auth(secret))
    ).json()
    assert done["status"] == "succeeded"
    assert done["progress"] is None
    assert done["finished_at"] is not None
    [image] = done["images"]
    assert image["index"] == 0
    assert image["seed"] == first["request"]["seed"]
    assert (
        image["url"] == f"http://testserver.local{GENERATIONS}/{first['id']}/images/0"
    )
    assert (image["width"], image["height"]) == (64, 64)


async def test_download_is_the_stored_png_with_text_chunks_and_cache_headers(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    generation = await submit(client, secret, {**SMALL, "num_images": 2})
    job = await node.claim()
    await node.start(job)
    made = await node.images(job)
    path = f"{GENERATIONS}/{generation['id']}/images/1"

    # Made but not stored yet: served from the node's copy, never cached.
    early = await client.get(path, headers=auth(secret))
    assert early.status == 200
    assert early.headers["Cache-Control"] == "no-store"
    assert await early.read() == made[1][1]

    await node.result_stored(job, made)
    response = await client.get(path, headers=auth(secret))
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/png"
    assert "immutable" in response.headers["Cache-Control"]
    assert "private" in response.headers["Cache-Control"]
    data = await response.read()
    assert data == made[1][1]
    assert response.headers["ETag"] == f'"{made[1][0].sha256}"'
    png = Image.open(io.BytesIO(data))
    assert "a red fox" in png.text["parameters"]  # type: ignore[attr-defined]

    again = await client.get(
        path, headers={**auth(secret), "If-None-Match": response.headers["ETag"]}
    )
    assert again.status == 304
    missing = await client.get(
        f"{GENERATIONS}/{generation['id']}/images/7", headers=auth(secret)
    )
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"
    bad = await client.get(
        f"{GENERATIONS}/{generation['id']}/images/x", headers=auth(secret)
    )
    assert bad.status == 404


async def test_other_users_generations_are_404(
    client: TestClient, node: NodeDouble
) -> None:
    _, owner = await make_user()
    _, other = await make_user()
    generation = await submit(client, owner, SMALL)
    for method, path in (
        ("GET", f"{GENERATIONS}/{generation['id']}"),
        ("GET", f"{GENERATIONS}/{generation['id']}/images/0"),
        ("DELETE", f"{GENERATIONS}/{generation['id']}"),
        ("GET", f"{GENERATIONS}/{uuid.uuid4()}"),
        ("GET", f"{GENERATIONS}/not-a-uuid"),
    ):
        response = await client.request(method, path, headers=auth(other))
        assert response.status == 404, (method, path)
        assert (await response.json())["error"]["code"] == "not_found"
    listed = await (await client.get(GENERATIONS, headers=auth(other))).json()
    assert listed == {"items": [], "next": None}
    still = await Generation.get(id=generation["id"])
    assert still.status is Status.QUEUED


async def test_list_is_own_newest_first_with_a_cursor(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user(premium=False)
    _, other = await make_user(premium=False)
    await submit(client, other, {**SMALL, "delivery": "email"})
    ids = [
        (await submit(client, secret, {**SMALL, "delivery": "email"}))["id"]
        for _ in range(5)
    ]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = {"limit": "2"} | ({"before": cursor} if cursor else {})
        response = await client.get(GENERATIONS, params=query, headers=auth(secret))
        assert response.status == 200
        page = await response.json()
        pages += 1
        seen.extend(item["id"] for item in page["items"])
        assert all(item["status"] == "scheduled" for item in page["items"])
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert pages == 3
    for bad in ({"limit": "0"}, {"limit": "101"}, {"before": "garbage!"}, {"x": "1"}):
        response = await client.get(GENERATIONS, params=bad, headers=auth(secret))
        assert response.status == 422, bad
        assert (await response.json())["error"]["code"] == "validation_error"


async def test_cancel_queued_work_leaves_the_queue(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    generation = await submit(client, secret, SMALL)
    response = await client.delete(
        f"{GENERATIONS}/{generation['id']}", headers=auth(secret)
    )
    assert response.status == 204
    shown = await (
        await client.get(f"{GENERATIONS}/{generation['id']}", headers=auth(secret))
    ).json()
    assert shown["status"] == "cancelled"
    assert shown["finished_at"] is not None
    assert await node.redis.zcard(premium_queue("tiny")) == 0
    assert await node.redis.get(cancel_key(generation["id"])) == b"1"
    events = await read_events(node.redis, generation["id"])
    assert [event.type for _, event in events] == ["queued", "done"]
    assert events[-1][1].status == "cancelled"  # type: ignore[union-attr]


async def test_cancel_running_work_flags_the_node_and_the_result_changes_nothing(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    generation = await submit(client, secret, SMALL)
    job = await node.claim()
    await node.start(job)
    response = await client.delete(
        f"{GENERATIONS}/{generation['id']}", headers=auth(secret)
    )
    assert response.status == 204
    assert await node.redis.get(cancel_key(generation["id"])) == b"1"
    # The node noticed too late and finished anyway: cancelled stays cancelled.
    assert await node.run(job) == "already final"
    row = await Generation.get(id=generation["id"])
    assert row.status is Status.CANCELLED
    dones = [
        e
        for _, e in await read_events(node.redis, generation["id"])
        if e.type == "done"
    ]
    assert len(dones) == 1


async def test_cancel_finished_work_is_204_and_changes_nothing(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    generation = await submit(client, secret, SMALL)
    await node.run(await node.claim())
    response = await client.delete(
        f"{GENERATIONS}/{generation['id']}", headers=auth(secret)
    )
    assert response.status == 204
    row = await Generation.get(id=generation["id"])
    assert row.status is Status.SUCCEEDED


async def test_a_known_model_without_a_node_waits_in_the_queue_for_one(
    client: TestClient, web_settings: WebSettings
) -> None:
    _, secret = await make_user()
    response = await client.post(GENERATIONS, json=SMALL, headers=auth(secret))
    assert response.status == 202
    body = await response.json()
    assert body["status"] == "queued" and body["waiting_for_node"] is True
    assert body["queue_position"] == 0
    # The queue depth the autoscaler reads counts it: demand from zero nodes.
    metrics = await (await client.get("/metrics")).text()
    assert 'sdapi_queue_depth{model="tiny",tier="premium"} 1.0' in metrics

    # A node comes up (scaled from zero) and takes the waiting job.
    assert web_settings.redis_url and web_settings.database_url
    async with jobs_context(web_settings.redis_url, web_settings.database_url) as ctx:
        node = NodeDouble(ctx)
        await node.announce()
        job = await node.claim()
        assert str(job.generation_id) == body["id"]
        assert await node.run(job) == "succeeded"
        shown = await client.get(f"{GENERATIONS}/{body['id']}", headers=auth(secret))
        done = await shown.json()
    assert done["status"] == "succeeded" and done["waiting_for_node"] is False


async def test_an_unknown_model_is_a_422_at_once(client: TestClient) -> None:
    _, secret = await make_user()
    response = await client.post(
        GENERATIONS, json={**SMALL, "model": "no-such-model"}, headers=auth(secret)
    )
    assert response.status == 422
    [detail] = (await response.json())["error"]["details"]
    assert detail["field"] == "model"
    assert await Generation.all().count() == 0


async def test_in_flight_limit_holds_under_concurrent_requests(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    responses = await asyncio.gather(
        *(client.post(GENERATIONS, json=SMALL, headers=auth(secret)) for _ in range(8))
    )
    statuses = sorted(response.status for response in responses)
    # The user's row lock serialises the checks: exactly the limit gets in.
    assert statuses == [202] * 4 + [429] * 4
    rejected = next(r for r in responses if r.status == 429)
    assert (await rejected.json())["error"]["code"] == "rate_limited"
    assert int(rejected.headers["Retry-After"]) > 0
    assert await node.redis.zcard(premium_queue("tiny")) == 4


async def test_daily_quota_is_429_quota_exceeded(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    from web.app import create_app

    settings = web_settings.model_copy(update={"premium_images_per_day": 3})
    client = await aiohttp_client(create_app(settings))
    assert settings.redis_url and settings.database_url
    async with jobs_context(settings.redis_url, settings.database_url) as ctx:
        await NodeDouble(ctx).announce()
        _, secret = await make_user()
        await submit(client, secret, {**SMALL, "num_images": 2})
        body = await submit(client, secret, {**SMALL, "num_images": 2}, status=429)
    assert body["error"]["code"] == "quota_exceeded"


async def test_unauthenticated_is_401(client: TestClient) -> None:
    for method, path in (
        ("POST", GENERATIONS),
        ("GET", GENERATIONS),
        ("GET", f"{GENERATIONS}/x"),
    ):
        response = await client.request(method, path, json=SMALL)
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "unauthorized"


BAD_REQUESTS = [
    ({"width": 100}, "width"),
    ({"height": 70}, "height"),
    ({"width": 2048}, "width"),
    ({"height": 1024}, "height"),  # under the tier's 1024 but over the model's 256
    ({"steps": 0}, "steps"),
    ({"steps": 10_000}, "steps"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**40}, "seed"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": 100}, "num_images"),
    ({"model": "no-such-model"}, "model"),
    ({"scheduler": "no-such-scheduler"}, "scheduler"),
    ({"prompt_syntax": "compel"}, "prompt_syntax"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 100_000}, "prompt"),
    ({"colour": "red"}, "colour"),
]


@pytest.mark.parametrize(("change", "field"), BAD_REQUESTS)
async def test_bad_input_is_422_naming_the_field(
    client: TestClient, node: NodeDouble, change: dict[str, Any], field: str
) -> None:
    _, secret = await make_user()
    body = await submit(client, secret, {**SMALL, **change}, status=422)
    assert body["error"]["code"] == "validation_error"
    assert field in [detail["field"] for detail in body["error"]["details"]]
    assert await Generation.all().count() == 0


async def test_nan_guidance_is_422_not_500(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    for literal in ("NaN", "Infinity", "-Infinity"):
        response = await client.post(
            GENERATIONS,
            data=f'{{"prompt": "a fox", "guidance_scale": {literal}}}',
            headers={**auth(secret), "Content-Type": "application/json"},
        )
        assert response.status == 422, literal
        body = await response.json()
        assert body["error"]["details"][0]["field"] == "guidance_scale"


async def test_normal_user_asking_for_download_is_422(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user(premium=False)
    body = await submit(client, secret, {**SMALL, "delivery": "download"}, status=422)
    assert body["error"]["details"] == [
        {
            "field": "delivery",
            "message": "Normal accounts get their images by email; "
            "download needs premium.",
        }
    ]


async def test_malformed_bodies_are_400(client: TestClient, node: NodeDouble) -> None:
    _, secret = await make_user()
    for data, content_type in (
        ("{", "application/json"),
        ("[1, 2]", "application/json"),
        ("prompt=fox", "application/x-www-form-urlencoded"),
        ("[" * 50_000 + "]" * 50_000, "application/json"),
    ):
        response = await client.post(
            GENERATIONS,
            data=data,
            headers={**auth(secret), "Content-Type": content_type},
        )
        assert response.status == 400, data[:20]
        assert (await response.json())["error"]["code"] == "bad_request"


async def test_unreachable_redis_is_503_not_500(
    client: TestClient, node: NodeDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = await make_user()

    async def down(self: object) -> None:
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(NodeRegistry, "offers", down)
    response = await client.post(GENERATIONS, json=SMALL, headers=auth(secret))
    assert response.status == 503
    assert int(response.headers["Retry-After"]) > 0
    assert (await response.json())["error"]["code"] == "unavailable"


async def test_cancel_holds_while_redis_is_unreachable(
    client: TestClient, node: NodeDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = await make_user()
    generation = await submit(client, secret, SMALL)
    app_redis = client.app[redis_key]  # type: ignore[index]

    async def down(*args: object, **kwargs: object) -> None:
        raise RedisConnectionError("Connection refused")

    monkeypatch.setattr(app_redis, "set", down)
    response = await client.delete(
        f"{GENERATIONS}/{generation['id']}", headers=auth(secret)
    )
    assert response.status == 204
    row = await Generation.get(id=generation["id"])
    assert row.status is Status.CANCELLED


async def test_tier_limits_are_enforced_below_the_models(
    client: TestClient, node: NodeDouble
) -> None:
    big = TINY.model_copy(
        update={
            "node_id": "double-2",
            "model": "sd15",
            "max_width": 1024,
            "max_height": 1024,
        }
    )
    await NodeDouble(node.ctx, big).announce()
    _, normal = await make_user(premium=False)
    _, premium = await make_user()
    request = {"prompt": "a fox", "model": "sd15", "delivery": "email"}
    for change, field in (
        ({"width": 768}, "width"),
        ({"steps": 51}, "steps"),
        ({"num_images": 5}, "num_images"),
    ):
        body = await submit(client, normal, {**request, **change}, status=422)
        assert [d["field"] for d in body["error"]["details"]] == [field]
        # The same request is within the premium tier's limits.
        await submit(client, premium, {**request, **change})


# --- regression tests of the review ---------------------------------------


def _png_queries(caplog: pytest.LogCaptureFixture) -> list[str]:
    """SQL statements logged by Tortoise that read PNG bytes (the `postgres`
    image store's table)."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "tortoise.db_client"
        and '"image_blobs"' in record.getMessage()
    ]


async def test_listing_showing_and_304_never_load_png_bytes(
    client: TestClient, node: NodeDouble, caplog: pytest.LogCaptureFixture
) -> None:
    _, secret = await make_user()
    generation = await submit(client, secret, {**SMALL, "num_images": 2})
    await node.run(await node.claim())
    path = f"{GENERATIONS}/{generation['id']}"
    image_path = f"{path}/images/1"
    first = await client.get(image_path, headers=auth(secret))
    assert first.status == 200

    caplog.set_level(logging.DEBUG, logger="tortoise.db_client")
    listed = await client.get(GENERATIONS, headers=auth(secret))
    assert [len(i["images"]) for i in (await listed.json())["items"]] == [2]
    shown = await client.get(path, headers=auth(secret))
    assert len((await shown.json())["images"]) == 2
    cached = await client.get(
        image_path, headers={**auth(secret), "If-None-Match": first.headers["ETag"]}
    )
    assert cached.status == 304
    assert _png_queries(caplog) == []
    # Only a 200 reads the bytes.
    again = await client.get(image_path, headers=auth(secret))
    assert await again.read() == await first.read()
    assert len(_png_queries(caplog)) == 1


async def test_huge_image_index_is_404_not_500(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    generation = await submit(client, secret, SMALL)
    for index in ("99999999999", "10000", "-1", "\u0661"):
        response = await client.get(
            f"{GENERATIONS}/{generation['id']}/images/{index}", headers=auth(secret)
        )
        assert response.status == 404, index
        assert (await response.json())["error"]["code"] == "not_found"
    signed = await client.get(
        f"{GENERATIONS}/{generation['id']}/images/99999999999",
        params={"expires": "1", "signature": "0" * 64},
    )
    assert signed.status == 404


async def test_cursor_near_the_start_of_time_is_422_not_500(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    raw = f"0001-01-01T00:00:00+05:00|{uuid.uuid4()}"
    cursor = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    response = await client.get(
        GENERATIONS, params={"before": cursor}, headers=auth(secret)
    )
    assert response.status == 422
    [detail] = (await response.json())["error"]["details"]
    assert detail["field"] == "before"


async def test_non_ascii_or_malformed_link_parameters_are_422_not_500(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    generation = await submit(client, secret, SMALL)
    path = f"{GENERATIONS}/{generation['id']}/images/0"
    for params in (
        {"expires": "9999999999", "signature": "é" * 64},
        {"expires": "9999999999", "signature": "A" * 64},
        {"expires": "soon", "signature": "0" * 64},
        {"expires": "\u0661\u0662\u0663", "signature": "0" * 64},
    ):
        response = await client.get(path, params=params)
        assert response.status == 422, params
        assert (await response.json())["error"]["code"] == "validation_error"
    forged = await client.get(
        path, params={"expires": "9999999999", "signature": "0" * 64}
    )
    assert forged.status == 401


def test_link_is_valid_compares_bytes() -> None:
    path = image_path(uuid.uuid4(), 0)
    url = signed_image_url("key", "http://x", path.split("/")[4], 0, now=1000.0)
    expires = int(url.split("expires=")[1].split("&")[0])
    signature = url.split("signature=")[1]
    assert link_is_valid("key", path, expires, signature, now=1000.0)
    assert not link_is_valid("key", path, expires, "é" * 64, now=1000.0)
    assert not link_is_valid("key", path, expires, "\udcff", now=1000.0)
    assert not link_is_valid("key", path, expires, signature, now=expires + 1.0)


async def test_null_negative_prompt_means_none(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    body = await submit(client, secret, {**SMALL, "negative_prompt": None})
    assert body["request"]["negative_prompt"] == ""
    job = await node.claim()
    assert job.params.negative_prompt == ""


async def test_premium_email_delivery_needs_a_verified_address(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user(premium=True, verified=False)
    body = await submit(client, secret, {**SMALL, "delivery": "email"}, status=403)
    assert body["error"]["code"] == "email_not_verified"
    # Nor anything else: premium does not stand in for a proven address.
    body = await submit(client, secret, SMALL, status=403)
    assert body["error"]["code"] == "email_not_verified"
    assert await Generation.all().count() == 0


async def test_an_internal_validation_error_is_a_500_not_a_422(
    client: TestClient, node: NodeDouble, caplog: pytest.LogCaptureFixture
) -> None:
    _, secret = await make_user()
    generation = await submit(client, secret, SMALL)
    # A row the code cannot read back: our bug, not the client's.
    await Generation.filter(id=generation["id"]).update(request={"prompt": 1})
    response = await client.get(
        f"{GENERATIONS}/{generation['id']}", headers=auth(secret)
    )
    assert response.status == 500
    body = await response.json()
    assert body["error"]["code"] == "internal_error"
    assert body["error"]["details"] == []
    assert any("unhandled error" in r.getMessage() for r in caplog.records)


async def test_cancel_uses_the_locked_rows_attempt(
    client: TestClient, node: NodeDouble
) -> None:
    from sdapi.infra.queue import enqueue_generation
    from web.generations import cancel_generation

    _, secret = await make_user()
    generation = await submit(client, secret, SMALL)
    stale = await Generation.get(id=generation["id"])
    # Meanwhile the reconciler re-enqueued it as attempt 2.
    job = await node.claim()
    await Generation.filter(id=stale.id).update(attempts=2)
    assert await enqueue_generation(
        node.redis, job.model_copy(update={"attempt": 2}), owner=str(stale.user_id)
    )
    assert await node.redis.zcard(premium_queue("tiny")) == 1
    assert await cancel_generation(client.app, stale)  # type: ignore[arg-type]
    # The attempt-2 job left the queue, not only the long-gone attempt 1.
    assert await node.redis.zcard(premium_queue("tiny")) == 0


async def test_purge_deletes_a_finished_generation_and_refuses_unfinished_work(
    client: TestClient, node: NodeDouble
) -> None:
    _, secret = await make_user()
    done = await submit(client, secret, SMALL)
    await node.run(await node.claim())
    waiting = await submit(client, secret, SMALL)
    refused = await client.delete(
        f"{GENERATIONS}/{waiting['id']}", params={"purge": "true"}, headers=auth(secret)
    )
    assert refused.status == 409
    assert (await refused.json())["error"]["code"] == "conflict"
    purged = await client.delete(
        f"{GENERATIONS}/{done['id']}", params={"purge": "true"}, headers=auth(secret)
    )
    assert purged.status == 204
    gone = await client.get(f"{GENERATIONS}/{done['id']}", headers=auth(secret))
    assert gone.status == 404
    image = await client.get(
        f"{GENERATIONS}/{done['id']}/images/0", headers=auth(secret)
    )
    assert image.status == 404

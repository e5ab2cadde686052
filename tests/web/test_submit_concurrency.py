"""Quotas hold when many submits of one user arrive at once, on two replicas.

The user's row lock and the one-statement check and insert after it
(web/quota.py insert_within_limits) must let exactly the quota through.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from aiohttp.test_utils import TestClient

from sdapi.contract.names import premium_queue
from sdapi.contract.status import Status, Tier
from sdapi.db.models import Generation, utcnow
from sdapi.devtools.accounts import auth, make_user
from tests.node_double import NodeDouble, jobs_context
from tests.web.accounts_support import add_generation
from web.app import create_app
from web.settings import WebSettings

GENERATIONS = "/api/v1/generations"
SMALL = {"prompt": "a cat", "width": 64, "height": 64, "steps": 4}
SUBMITS = 64


async def _two_replicas(
    aiohttp_client: Any, settings: WebSettings
) -> tuple[TestClient, TestClient]:
    return (
        await aiohttp_client(create_app(settings)),
        await aiohttp_client(create_app(settings)),
    )


async def _submit_all(
    replicas: tuple[TestClient, TestClient], secret: str, body: dict[str, Any]
) -> list[tuple[int, dict[str, Any]]]:
    async def one(n: int) -> tuple[int, dict[str, Any]]:
        response = await replicas[n % 2].post(
            GENERATIONS, json=body, headers=auth(secret)
        )
        return response.status, await response.json()

    return await asyncio.gather(*(one(n) for n in range(SUBMITS)))


async def test_64_premium_submits_at_the_quota_edge_accept_exactly_the_quota(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(
        update={"premium_images_per_day": 41, "premium_max_in_flight": 1000}
    )
    replicas = await _two_replicas(aiohttp_client, settings)
    assert settings.redis_url and settings.database_url
    async with jobs_context(settings.redis_url, settings.database_url) as ctx:
        node = NodeDouble(ctx)
        await node.announce()
        user, secret = await make_user()
        # One image already spent today: 40 left, and 64 ask for one each.
        first = await replicas[0].post(GENERATIONS, json=SMALL, headers=auth(secret))
        assert first.status == 202
        answers = await _submit_all(replicas, secret, SMALL)
        statuses = sorted(status for status, _ in answers)
        assert statuses == [202] * 40 + [429] * 24
        codes = {body["error"]["code"] for status, body in answers if status == 429}
        assert codes == {"quota_exceeded"}
        # Every 202 is a committed row, and each went to the queue.
        assert await Generation.filter(user_id=user.id).count() == 41
        assert await node.redis.zcard(premium_queue("tiny")) == 41


async def test_64_normal_submits_at_the_quota_edge_accept_exactly_the_quota(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(update={"normal_images_per_day": 30})
    replicas = await _two_replicas(aiohttp_client, settings)
    assert settings.redis_url and settings.database_url
    async with jobs_context(settings.redis_url, settings.database_url) as ctx:
        await NodeDouble(ctx).announce()
        user, secret = await make_user(premium=False)
        answers = await _submit_all(replicas, secret, {**SMALL, "num_images": 2})
    statuses = sorted(status for status, _ in answers)
    assert statuses == [202] * 15 + [429] * 49
    assert {body["error"]["code"] for s, body in answers if s == 429} == {
        "quota_exceeded"
    }
    rows = await Generation.filter(user_id=user.id).values_list("status", flat=True)
    assert sorted(rows) == [Status.SCHEDULED] * 15


async def test_64_premium_submits_at_the_in_flight_edge_accept_exactly_the_limit(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    settings = web_settings.model_copy(update={"premium_max_in_flight": 10})
    replicas = await _two_replicas(aiohttp_client, settings)
    assert settings.redis_url and settings.database_url
    async with jobs_context(settings.redis_url, settings.database_url) as ctx:
        await NodeDouble(ctx).announce()
        user, secret = await make_user()
        answers = await _submit_all(replicas, secret, SMALL)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [202] * 10 + [429] * 54
    assert {body["error"]["code"] for s, body in answers if s == 429} == {
        "rate_limited"
    }
    assert await Generation.filter(user_id=user.id).count() == 10


async def test_the_check_counts_work_still_in_flight_from_yesterday_not_history(
    aiohttp_client: Any, web_settings: WebSettings
) -> None:
    # The statement reads only today's rows and those still in flight: a
    # premium job from before midnight still holds its slot, and the user's
    # older history counts for nothing.
    settings = web_settings.model_copy(
        update={"premium_max_in_flight": 2, "premium_images_per_day": 3}
    )
    client = await aiohttp_client(create_app(settings))
    assert settings.redis_url and settings.database_url
    async with jobs_context(settings.redis_url, settings.database_url) as ctx:
        await NodeDouble(ctx).announce()
        user, secret = await make_user()
        before_today = utcnow() - timedelta(days=1, hours=1)
        for status in (Status.RUNNING, Status.SUCCEEDED, Status.SUCCEEDED):
            await add_generation(
                str(user.id),
                status=status,
                num_images=4,
                tier=Tier.PREMIUM,
                created_at=before_today,
            )
        first = await client.post(GENERATIONS, json=SMALL, headers=auth(secret))
        assert first.status == 202
        second = await client.post(GENERATIONS, json=SMALL, headers=auth(secret))
    assert second.status == 429
    assert (await second.json())["error"]["code"] == "rate_limited"

"""/me and its quota."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from aiohttp.test_utils import TestClient

from sdapi.contract.status import Status, Tier
from sdapi.db.models import (
    User,
    utcnow,
)
from tests.web.accounts_support import (
    ME,
    add_generation,
    bearer,
    signin,
    signup,
)
from web.quota import usage
from web.token_cache import announce_user_changed


async def test_usage_counts_todays_images_and_premium_work_in_flight(
    client: TestClient,
) -> None:
    user_id = (await signup(client, "quota@example.org"))["user"]["id"]
    other_id = (await signup(client, "other@example.org"))["user"]["id"]
    now = datetime(2031, 5, 17, 0, 30, tzinfo=UTC)
    today = now.replace(minute=5)
    yesterday = now - timedelta(hours=1)
    for status, images, when in [
        (Status.SUCCEEDED, 3, today),
        (Status.SCHEDULED, 2, today),
        (Status.FAILED, 4, today),  # failures give their images back
        (Status.CANCELLED, 5, today),
        (Status.SUCCEEDED, 7, yesterday),  # 23:30 UTC the day before
    ]:
        await add_generation(user_id, status=status, num_images=images, created_at=when)
    for owner, status, when in [
        (user_id, Status.QUEUED, today),
        (user_id, Status.RUNNING, yesterday),  # in flight, but counted yesterday
        (user_id, Status.SUCCEEDED, today),
        (other_id, Status.QUEUED, today),  # someone else's
    ]:
        await add_generation(
            owner, status=status, num_images=1, tier=Tier.PREMIUM, created_at=when
        )

    user = await User.get(id=user_id)
    used = await usage(user, now)
    assert used.images_today == 3 + 2 + 1 + 1
    assert used.in_flight == 2


async def test_me_shows_the_quota_of_the_current_tier(client: TestClient) -> None:
    user_id = (await signup(client, "me@example.org"))["user"]["id"]
    token = (await signin(client, "me@example.org"))["token"]
    await add_generation(user_id, status=Status.SUCCEEDED, num_images=3)
    await add_generation(user_id, status=Status.QUEUED, num_images=2, tier=Tier.PREMIUM)
    me = await (await client.get(ME, headers=bearer(token))).json()
    assert me["tier"] == "normal"
    assert me["quota"] == {
        "images_today": 5,
        "images_per_day": 50,
        "in_flight": 1,
        "max_in_flight": None,
        "max_upload_bytes": 4 * 1024 * 1024,
        "max_upload_pixels": 2048 * 2048,
    }
    await User.filter(id=user_id).update(premium_until=utcnow() + timedelta(days=1))
    # As `sdapi user set-premium` and the redeem route do after the change.
    await announce_user_changed(client.server.app, uuid.UUID(user_id))
    me = await (await client.get(ME, headers=bearer(token))).json()
    assert me["tier"] == "premium"
    assert me["quota"]["images_per_day"] == 2000
    assert me["quota"]["max_in_flight"] == 4

"""Premium codes: redeeming, stacking, refusing."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from aiohttp.test_utils import TestClient

from sdapi.db.models import (
    PremiumCode,
    User,
    utcnow,
)
from sdapi.db.premium import canonical_code, code_hash, new_code
from tests.web.accounts_support import (
    REDEEM,
    bearer,
    error_of,
    make_code,
    mark_verified,
    signin,
    signup,
)


async def test_redeem_adds_the_codes_days_to_premium_time_left(
    client: TestClient,
) -> None:
    await signup(client, "buyer@example.org")
    await mark_verified("buyer@example.org")
    token = (await signin(client, "buyer@example.org"))["token"]
    three, two = await make_code(3), await make_code(2)

    before = utcnow()
    response = await client.post(REDEEM, json={"code": three}, headers=bearer(token))
    assert response.status == 200
    user = await response.json()
    assert user["tier"] == "premium"
    until = datetime.fromisoformat(user["premium_until"])
    assert before + timedelta(days=3) <= until <= utcnow() + timedelta(days=3)

    # Typed sloppily: lower case, spaces instead of dashes, 0 for O.
    sloppy = two.lower().replace("-", " ").replace("o", "0")
    response = await client.post(REDEEM, json={"code": sloppy}, headers=bearer(token))
    assert response.status == 200
    later = datetime.fromisoformat((await response.json())["premium_until"])
    assert later == until + timedelta(days=2)

    stored = await PremiumCode.filter(redeemed_at__not_isnull=True).count()
    assert stored == 2


async def test_redeem_rejects_used_unknown_and_malformed_codes(
    client: TestClient,
) -> None:
    await signup(client, "first@example.org")
    await signup(client, "second@example.org")
    await mark_verified("first@example.org", "second@example.org")
    first = (await signin(client, "first@example.org"))["token"]
    second = (await signin(client, "second@example.org"))["token"]
    code = await make_code(1)
    assert (
        await client.post(REDEEM, json={"code": code}, headers=bearer(first))
    ).status == 200

    for token in (first, second):
        response = await client.post(REDEEM, json={"code": code}, headers=bearer(token))
        error = await error_of(response, 409, "conflict")
        assert "already been redeemed" in error["message"]
    unknown = new_code()
    response = await client.post(REDEEM, json={"code": unknown}, headers=bearer(second))
    await error_of(response, 404, "not_found")
    for text in ("SDAPI-!!!", "hello", "SDAPI-AAAAA-AAAAA-AAAAA-AAAA"):
        response = await client.post(
            REDEEM, json={"code": text}, headers=bearer(second)
        )
        await error_of(response, 404, "not_found")
    for body in ({}, {"code": ""}, {"code": code, "days": 99}, {"code": 12}):
        response = await client.post(REDEEM, json=body, headers=bearer(second))
        await error_of(response, 422, "validation_error")
    await error_of(await client.post(REDEEM, json={"code": code}), 401, "unauthorized")
    second_user = await User.get(email_key="second@example.org")
    assert second_user.premium_until is None


async def test_two_concurrent_redeems_of_one_code_succeed_once(
    client: TestClient,
) -> None:
    tokens = []
    for name in ("racer1", "racer2"):
        await signup(client, f"{name}@example.org")
        await mark_verified(f"{name}@example.org")
        tokens.append((await signin(client, f"{name}@example.org"))["token"])
    for _ in range(3):
        code = await make_code(5)
        responses = await asyncio.gather(
            *(
                client.post(REDEEM, json={"code": code}, headers=bearer(token))
                for token in [*tokens, tokens[0]]
            )
        )
        assert sorted(response.status for response in responses) == [200, 409, 409]
        row = await PremiumCode.get(code_hash=code_hash(canonical_code(code) or ""))
        assert row.redeemed_at is not None
    users = await User.filter(email_key__startswith="racer")
    granted = sum(
        round((user.premium_until - utcnow()).total_seconds() / 86400)
        for user in users
        if user.premium_until is not None
    )
    assert granted == 15

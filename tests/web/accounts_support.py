"""What the account tests share: addresses, sign-up and sign-in, errors, mail."""

from __future__ import annotations

import contextlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from pydantic import SecretStr

from jobs.resources import JobsResources
from jobs.settings import JobsSettings
from sdapi.contract.status import Status, Tier
from sdapi.db.models import (
    Delivery,
    Generation,
    OutboxEmail,
    PremiumCode,
    User,
    utcnow,
)
from sdapi.db.premium import canonical_code, code_hash, new_code
from sdapi.infra.registry import NodeRegistry
from web.appkeys import redis_key, stores_key

PASSWORD = "correct horse battery"


SIGNUP = "/api/v1/auth/signup"


SIGNIN = "/api/v1/auth/signin"


SIGNOUT = "/api/v1/auth/signout"


VERIFY = "/api/v1/auth/verify"


ME = "/api/v1/me"


REDEEM = "/api/v1/premium/redeem"


JSON = {"Accept": "application/json"}


BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


LINK = re.compile(r"http://testserver\.local/api/v1/auth/verify\?token=([\w-]+)")


async def signup(
    client: TestClient, email_address: str, password: str = PASSWORD, **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        SIGNUP, json={"email": email_address, "password": password, **extra}
    )
    assert response.status == 201, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def signin(
    client: TestClient, email_address: str, password: str = PASSWORD, **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        SIGNIN, json={"email": email_address, "password": password, **extra}
    )
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    """The error object of a response that must be `status` / `code`."""
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


async def verification_token(email_address: str) -> str:
    """The token in the verification email written to the outbox."""
    row = await OutboxEmail.get(to_address=email_address)
    match = LINK.search(row.text_body)
    assert match is not None, row.text_body
    assert match.group(0) in (row.html_body or "")
    return match.group(1)


async def make_code(days: int) -> str:
    code = new_code()
    canonical = canonical_code(code)
    assert canonical is not None
    await PremiumCode.create(code_hash=code_hash(canonical), days=days)
    return code


def _json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


OK = {"email": "a@example.org", "password": "0123456789"}


FORM = "application/x-www-form-urlencoded"


def jobs_resources(client: TestClient, smtp_url: str, tmp_path: Path) -> JobsResources:
    """The jobs worker's resources, sharing the app's database and Redis."""
    redis = client.app[redis_key]
    settings = JobsSettings(
        database_url="postgres://unused/unused",
        redis_url="redis://unused/0",
        smtp_url=smtp_url,
        data_dir=tmp_path,
        secret_key=SecretStr("test-secret-key"),
        public_url="http://testserver.local",
    )
    return JobsResources(
        settings=settings,
        redis=redis,
        registry=NodeRegistry(redis),
        stack=contextlib.AsyncExitStack(),
        stores=client.app[stores_key],
    )


def set_cookie_of(response: Any, name: str) -> str:
    """The one Set-Cookie header of a response that sets `name`."""
    [header] = [
        value
        for value in response.headers.getall("Set-Cookie", [])
        if value.startswith(f"{name}=")
    ]
    return str(header)


async def add_generation(
    user_id: Any,
    *,
    status: Status,
    num_images: int,
    tier: Tier = Tier.NORMAL,
    created_at: datetime | None = None,
) -> None:
    generation = await Generation.create(
        user_id=user_id,
        tier=tier,
        status=status,
        delivery=Delivery.EMAIL,
        model="tiny",
        request={"prompt": "a cat"},
        width=64,
        height=64,
        steps=4,
        guidance_scale=5.0,
        scheduler="euler",
        num_images=num_images,
    )
    if created_at is not None:
        await Generation.filter(id=generation.id).update(created_at=created_at)


async def mark_verified(*addresses: str) -> None:
    """As following the emailed link would: redeeming needs a verified address."""
    await User.filter(email_key__in=list(addresses)).update(email_verified_at=utcnow())


RESEND = "/api/v1/auth/verify/resend"

"""web's 302 to the store: the URL it hands out is signed for the owner's
object only, lives for SDAPI_STORAGE_PRESIGN_S, and verifies with the
independent SigV4 check of tests/sigv4.py (moto would accept
it whatever its signature said)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote, urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from sdapi.db.image_store import ImageStores
from sdapi.db.models import GeneratedImage, Generation, User
from sdapi.devtools.accounts import auth, make_user
from sdapi.devtools.s3_server import S3_ENV
from sdapi.infra.object_store import parse_store_url, result_object_key
from tests.sigv4 import Rejected, signed_at, verify
from tests.web.conftest import AiohttpClient
from web.app import create_app
from web.settings import WebSettings

LIFETIME_S = 120
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64


@pytest.fixture
async def client(
    aiohttp_client: AiohttpClient, web_settings: WebSettings, s3_url: str
) -> TestClient:
    settings = web_settings.model_copy(
        update={
            "storage_url": s3_url,
            "storage_redirect": True,
            "storage_presign_s": LIFETIME_S,
        }
    )
    result: TestClient = await aiohttp_client(create_app(settings))
    return result


async def stored_generation(s3_url: str, user: User) -> uuid.UUID:
    """A succeeded generation whose one image is in the S3 store."""
    generation = await Generation.create(
        id=uuid.uuid4(),
        user=user,
        tier="premium",
        status="succeeded",
        delivery="download",
        model="tiny",
        request={"prompt": "a fox", "model": "tiny", "seed": 1},
        width=64,
        height=64,
        steps=4,
        guidance_scale=7.5,
        scheduler="euler",
        num_images=1,
        attempts=1,
    )
    stores = ImageStores(s3_url, timeout_s=5)
    try:
        stored = await stores.write(result_object_key(generation.id, 0), PNG)
    finally:
        await stores.close()
    await GeneratedImage.create(
        id=uuid.uuid4(),
        generation=generation,
        index=0,
        seed=1,
        width=64,
        height=64,
        sha256=hashlib.sha256(PNG).hexdigest(),
        store=stored.store,
        object_key=stored.object_key,
        size=stored.size,
    )
    return generation.id


async def test_the_redirect_is_signed_for_the_object_and_the_configured_life(
    client: TestClient, s3_url: str
) -> None:
    owner = await make_user()
    ident = await stored_generation(s3_url, owner.user)
    before = datetime.now(UTC).replace(microsecond=0)
    answer = await client.get(
        f"/api/v1/generations/{ident}/images/0",
        headers=owner.headers,
        allow_redirects=False,
    )
    assert answer.status == 302
    location = answer.headers["Location"]
    query = verify(
        location, secret=S3_ENV["AWS_SECRET_ACCESS_KEY"], now=datetime.now(UTC)
    )
    assert query["X-Amz-Expires"] == str(LIFETIME_S)
    signed = signed_at(query)
    assert before <= signed <= datetime.now(UTC)
    # Exactly this image's object, in the store's bucket and prefix.
    spec = parse_store_url(s3_url)
    assert unquote(urlsplit(location).path) == (
        f"/{spec.bucket}/{spec.prefix}{result_object_key(ident, 0)}"
    )
    with pytest.raises(Rejected, match="expired"):
        verify(
            location,
            secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            now=signed + timedelta(seconds=LIFETIME_S + 1),
        )
    # And it downloads the image without credentials.
    async with aiohttp.ClientSession() as anonymous, anonymous.get(location) as got:
        assert got.status == 200
        assert await got.read() == PNG
    # Another user gets no URL at all.
    other = await make_user()
    refused = await client.get(
        f"/api/v1/generations/{ident}/images/0",
        headers=auth(other.secret),
        allow_redirects=False,
    )
    assert refused.status == 404
    assert "Location" not in refused.headers

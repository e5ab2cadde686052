"""Presigned download URLs are signed right and expire when they should.

moto's server checks neither signatures nor expiry (the last test here shows
it), so a download that works against it proves nothing about either. These
tests check the URLs S3Store.presign makes with an independent SigV4 verifier
(tests/sigv4.py, written from AWS's specification, no code shared with
botocore): the canonical request, the string to sign, the signing key derived
from the secret, and the expiry an S3 server enforces.

Signing is local, so no server is needed: a store with an endpoint is enough.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest

from sdapi.infra.object_store import parse_store_url
from sdapi.infra.s3_store import S3Store
from sdapi.infra.settings import CommonSettings
from tests.s3_server import S3_ENV, MotoServer
from tests.sigv4 import Rejected, signed_at, verify
from tests.support import until

SECRET = S3_ENV["AWS_SECRET_ACCESS_KEY"]
ACCESS_KEY = S3_ENV["AWS_ACCESS_KEY_ID"]
# Nothing listens there: presigning never connects.
ENDPOINT = "http://s3.example.test:9000"
KEY = "results/0b6f9c52-5bd3-4a8e-9a43-0f6a0c1f2d3e/2.png"


def with_query(url: str, **changes: str) -> str:
    """`url` with some query parameters replaced, the rest as they were."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


@pytest.fixture
async def store(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[S3Store]:
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    spec = parse_store_url(
        f"s3://sdapi-images/deployment-a?endpoint={ENDPOINT}&region=eu-central-1"
    )
    opened = S3Store(spec, timeout_s=5)
    try:
        yield opened
    finally:
        await opened.close()


def now() -> datetime:
    return datetime.now(UTC)


async def test_a_presigned_url_verifies_with_an_independent_sigv4(
    store: S3Store,
) -> None:
    expires_s = CommonSettings().storage_presign_s
    before = now().replace(microsecond=0)
    url = await store.presign(KEY, filename="cat 2.png", expires_s=expires_s)
    after = now()
    assert url is not None
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == ENDPOINT
    # Path-style: bucket, then the prefix, then the key.
    assert unquote(parts.path) == f"/sdapi-images/deployment-a/{KEY}"
    query = verify(url, secret=SECRET, now=after)
    assert query["X-Amz-Expires"] == str(expires_s)
    signed = signed_at(query)
    assert before <= signed <= after
    assert query["X-Amz-Credential"] == (
        f"{ACCESS_KEY}/{signed:%Y%m%d}/eu-central-1/s3/aws4_request"
    )
    # What the browser is told about the file is signed with it.
    assert query["response-content-type"] == "image/png"
    assert query["response-content-disposition"] == 'inline; filename="cat 2.png"'
    assert query["response-cache-control"] == f"private, max-age={expires_s}"
    # The secret never travels in the URL.
    assert SECRET not in unquote(url)


async def test_the_configured_lifetime_is_the_urls(store: S3Store) -> None:
    for expires_s in (10, 300, 3600):
        url = await store.presign(KEY, filename="a.png", expires_s=expires_s)
        assert url is not None
        query = verify(url, secret=SECRET, now=now())
        assert query["X-Amz-Expires"] == str(expires_s)


async def test_a_changed_url_no_longer_verifies(store: S3Store) -> None:
    url = await store.presign(KEY, filename="a.png", expires_s=300)
    assert url is not None
    verify(url, secret=SECRET, now=now())
    # Rewritten unchanged it still verifies: what fails below is the change.
    verify(with_query(url), secret=SECRET, now=now())
    parts = urlsplit(url)
    tampered = {
        "another object": urlunsplit(
            parts._replace(path=parts.path.replace("/2.png", "/3.png"))
        ),
        "another user's prefix": urlunsplit(
            parts._replace(path=parts.path.replace("deployment-a", "deployment-b"))
        ),
        "a longer life": with_query(url, **{"X-Amz-Expires": "604800"}),
        "an earlier date": with_query(
            url,
            **{"X-Amz-Date": (now() - timedelta(minutes=1)).strftime("%Y%m%dT%H%M%SZ")},
        ),
        "another file name": with_query(
            url, **{"response-content-disposition": 'attachment; filename="x.exe"'}
        ),
        "another type": with_query(url, **{"response-content-type": "text/html"}),
        "an added parameter": url + "&versionId=1",
        "another host": urlunsplit(parts._replace(netloc="s3.example.test:9001")),
        "another signature": with_query(url, **{"X-Amz-Signature": "0" * 64}),
    }
    for what, changed in tampered.items():
        assert changed != url, what
        # (An earlier date just after midnight fails the scope check first.)
        with pytest.raises(Rejected, match=r"signature does not match|scope's date"):
            verify(changed, secret=SECRET, now=now())
    # And a URL signed with another secret is refused.
    with pytest.raises(Rejected, match="signature does not match"):
        verify(url, secret=SECRET + "x", now=now())


async def test_a_url_past_its_lifetime_is_expired(store: S3Store) -> None:
    url = await store.presign(KEY, filename="a.png", expires_s=60)
    assert url is not None
    query = verify(url, secret=SECRET, now=now())
    signed = signed_at(query)
    # Still good at the last second of its life, refused the second after.
    verify(url, secret=SECRET, now=signed + timedelta(seconds=60))
    with pytest.raises(Rejected, match="expired"):
        verify(url, secret=SECRET, now=signed + timedelta(seconds=61))


def test_settings_keep_presigned_urls_short_lived() -> None:
    assert CommonSettings.model_fields["storage_presign_s"].default == 300
    # S3 refuses X-Amz-Expires above 7 days; within minutes is the contract.
    assert CommonSettings(storage_presign_s=3600).storage_presign_s == 3600
    for bad in (0, 9, 3601, 7 * 24 * 3600):
        with pytest.raises(ValueError, match="storage_presign_s"):
            CommonSettings(storage_presign_s=bad)


async def test_motos_server_serves_an_expired_url(
    s3_server: MotoServer, s3_url: str
) -> None:
    """Why the checks above exist: moto enforces no expiry (nor signature), so
    a real-server expiry test against it could not fail. Should moto start
    refusing expired URLs, this fails: then test expiry against it too."""
    real = S3Store(parse_store_url(s3_url), timeout_s=5)
    try:
        await real.put(KEY, b"\x89PNG old")
        url = await real.presign(KEY, filename="a.png", expires_s=1)
    finally:
        await real.close()
    assert url is not None
    query = verify(url, secret=SECRET, now=now())
    ends = signed_at(query) + timedelta(seconds=1)
    await until(lambda: now() > ends + timedelta(seconds=1), what="the URL to expire")
    with pytest.raises(Rejected, match="expired"):
        verify(url, secret=SECRET, now=now())
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        assert answer.status == 200
        assert await answer.read() == b"\x89PNG old"

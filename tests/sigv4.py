"""An S3 SigV4 presigned-URL verifier written from AWS's specification
(docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html),
sharing no code with botocore: the canonical request, the string to sign,
the signing key derived from the secret, and the expiry an S3 server
enforces (X-Amz-Date + X-Amz-Expires). moto checks neither signatures nor
expiry, so tests check presigned URLs with this."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from tests.s3_server import S3_ENV

ALGORITHM = "AWS4-HMAC-SHA256"
# The one key id the suite signs with (tests/s3_server.py).
ACCESS_KEY = S3_ENV["AWS_ACCESS_KEY_ID"]


class Rejected(Exception):
    """What an S3 server would answer 403 to, and why."""


def _encode(text: str) -> str:
    # SigV4's UriEncode: every byte but the unreserved characters.
    return quote(text, safe="-_.~")


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def verify(url: str, *, secret: str, now: datetime) -> dict[str, str]:
    """Check a presigned GET as an S3 server does; its query on success."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    query = dict(pairs)
    if len(query) != len(pairs):
        raise Rejected("a parameter given twice")
    if query.get("X-Amz-Algorithm") != ALGORITHM:
        raise Rejected("not SigV4")
    signature = query.get("X-Amz-Signature", "")
    access_key, date, region, service, terminator = query["X-Amz-Credential"].split("/")
    if service != "s3" or terminator != "aws4_request":
        raise Rejected("bad credential scope")
    signed_at = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=UTC
    )
    if signed_at.strftime("%Y%m%d") != date:
        raise Rejected("the scope's date is not the signing date")
    signed_headers = query["X-Amz-SignedHeaders"].split(";")
    if signed_headers != ["host"]:
        raise Rejected(f"unexpected signed headers {signed_headers}")
    canonical_query = "&".join(
        f"{_encode(name)}={_encode(value)}"
        for name, value in sorted(pairs)
        if name != "X-Amz-Signature"
    )
    canonical_request = "\n".join(
        [
            "GET",
            # S3 encodes each path segment once; the slashes stay.
            quote(unquote(parts.path), safe="/-_.~"),
            canonical_query,
            f"host:{parts.netloc}\n",
            "host",
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = f"{date}/{region}/{service}/{terminator}"
    string_to_sign = "\n".join(
        [
            ALGORITHM,
            query["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = _hmac(f"AWS4{secret}".encode(), date)
    for step in (region, service, terminator):
        key = _hmac(key, step)
    expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise Rejected("signature does not match")
    if access_key != ACCESS_KEY:
        raise Rejected("unknown access key")
    expires = int(query["X-Amz-Expires"])
    if not 1 <= expires <= 7 * 24 * 3600:
        raise Rejected("X-Amz-Expires out of range")
    if now > signed_at + timedelta(seconds=expires):
        raise Rejected("expired")
    return query


def signed_at(query: dict[str, str]) -> datetime:
    """When a verified URL was signed (its X-Amz-Date)."""
    return datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)

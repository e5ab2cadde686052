"""Where image bytes live: one small interface over a folder, PostgreSQL or S3.

PostgreSQL keeps every image's metadata; the bytes go to the store that
`SDAPI_STORAGE_URL` names when they are written, and each row records that
store's location, so a reader always finds the bytes where they were put, also
while `sdapi storage migrate` moves them (docs/ARCHITECTURE.md).

Every operation has a deadline (the store's `timeout_s`): a store that stalls or
is down raises `StoreUnavailable`, which web answers with a 503 and jobs
retries; it never hangs a request.
"""

from __future__ import annotations

import hashlib
import posixpath
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

# The location of the database's own store (the embedded default).
POSTGRES_LOCATION = "postgres"

# Streamed downloads read the store in pieces of this size.
CHUNK_BYTES = 256 * 1024

StoreKind = Literal["postgres", "file", "s3"]


class StoreError(Exception):
    """Base of the object store's errors."""


class StoreUnavailable(StoreError):
    """The store did not answer in time, or refused: try again later."""


class ObjectMissing(StoreError):
    """No object under that key."""


class BadStoreUrl(ValueError):
    """`SDAPI_STORAGE_URL` (or `--to`) names no store we can open."""


@dataclass(frozen=True)
class StoreSpec:
    """A parsed store URL. `location` is its canonical spelling: the value
    kept in image rows, free of credentials (those come from the
    environment), so the same store is always spelled the same way."""

    kind: StoreKind
    location: str
    # file: the folder. s3: the bucket, the key prefix ('' or ending in '/'),
    # the endpoint (None: AWS's own) and the region.
    path: str = ""
    bucket: str = ""
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None


def parse_store_url(url: str) -> StoreSpec:
    """`postgres`, `file:///path` or `s3://bucket/prefix?endpoint=...&region=...`."""
    text = url.strip()
    if text in {"postgres", "postgres:", "postgres://"}:
        return StoreSpec(kind="postgres", location=POSTGRES_LOCATION)
    parts = urlsplit(text)
    if parts.scheme == "file":
        if parts.netloc not in {"", "localhost"} or not parts.path.startswith("/"):
            raise BadStoreUrl("a file store is file:///absolute/path")
        if parts.query:
            raise BadStoreUrl("a file store takes no options")
        # One spelling per folder ("/a//b/" is "/a/b"): rows name it.
        path = posixpath.normpath("/" + parts.path.strip("/"))
        return StoreSpec(kind="file", location=f"file://{path}", path=path)
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not bucket or "@" in bucket or ":" in bucket:
            raise BadStoreUrl(
                "an S3 store is s3://bucket/prefix?endpoint=URL&region=NAME "
                "(credentials come from the AWS_* variables, never the URL)"
            )
        prefix = parts.path.strip("/")
        prefix = f"{prefix}/" if prefix else ""
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(options) - {"endpoint", "region"}
        if unknown:
            raise BadStoreUrl(
                f"unknown S3 store option(s): {', '.join(sorted(unknown))}"
            )
        endpoint = options.get("endpoint") or None
        if endpoint is not None:
            scheme = urlsplit(endpoint).scheme
            if scheme not in {"http", "https"} or not urlsplit(endpoint).netloc:
                raise BadStoreUrl("endpoint must be an http(s):// URL")
            endpoint = endpoint.rstrip("/")
        region = options.get("region") or None
        query = urlencode(
            {
                k: v
                for k, v in (("endpoint", endpoint), ("region", region))
                if v is not None
            },
            safe=":/",
        )
        location = f"s3://{bucket}/{prefix}" + (f"?{query}" if query else "")
        return StoreSpec(
            kind="s3",
            location=location,
            bucket=bucket,
            prefix=prefix,
            endpoint=endpoint,
            region=region,
        )
    raise BadStoreUrl(
        "SDAPI_STORAGE_URL must be postgres, file:///path or s3://bucket/prefix"
    )


def result_object_key(generation_id: uuid.UUID, index: int) -> str:
    """The key of a generated image: one per (generation, index), so a retried
    store writes the same object again."""
    return f"results/{generation_id}/{index}.png"


def input_object_key(user_id: uuid.UUID, image_id: uuid.UUID) -> str:
    """The key of an uploaded input (an `InputImage` row). Keyed by the row,
    not the content: an upload made again after its row was deleted gets a
    new key, so the old key's queued deletion can never remove it."""
    return f"inputs/{user_id}/{image_id}.png"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class OpenedObject:
    """An object being read: its size, and its bytes in pieces."""

    size: int
    chunks: AsyncIterator[bytes]


class ObjectStore(Protocol):
    """One image store. Keys are relative (`results/...`, `inputs/...`)."""

    @property
    def location(self) -> str:
        """The canonical location (`StoreSpec.location`) kept in image rows."""
        ...

    async def put(self, key: str, data: bytes) -> None:
        """Write (or overwrite) an object; it is durable when this returns."""
        ...

    async def get(self, key: str) -> bytes:
        """An object's bytes; ObjectMissing if there is none."""
        ...

    async def open(self, key: str) -> OpenedObject:
        """An object to stream; ObjectMissing if there is none. The deadline
        covers opening it; each piece read has a deadline of its own."""
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete these objects; a key with no object is not an error."""
        ...

    async def presign(self, key: str, *, filename: str, expires_s: int) -> str | None:
        """A URL that downloads the object without credentials for `expires_s`
        seconds, or None where the store cannot give one (then web streams)."""
        ...

    async def close(self) -> None: ...

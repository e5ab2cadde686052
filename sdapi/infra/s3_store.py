"""The S3-compatible store (`s3://bucket/prefix?endpoint=...&region=...`).

aiobotocore signs the requests and presigned URLs (SigV4); credentials come
from the standard AWS chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, an instance role), never from SDAPI_STORAGE_URL, so the URL can
be kept in every image row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from sdapi.infra.object_store import (
    CHUNK_BYTES,
    ObjectMissing,
    OpenedObject,
    StoreSpec,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

T = TypeVar("T")

# S3's DeleteObjects takes at most this many keys per call.
_DELETE_BATCH = 1000
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Store:
    def __init__(self, spec: StoreSpec, *, timeout_s: float) -> None:
        self._spec = spec
        self._timeout_s = timeout_s
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None
        self._opening = asyncio.Lock()

    @property
    def location(self) -> str:
        return self._spec.location

    async def _s3(self) -> S3Client:
        # Opened on first use: a web that never touches this store (an old
        # location no row names any more) never needs its credentials.
        async with self._opening:
            if self._client is not None:
                return self._client
            client: S3Client = await self._stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=self._spec.endpoint,
                    region_name=self._spec.region or "us-east-1",
                    config=self._config(),
                )
            )
            self._client = client
            return client

    def _config(self) -> AioConfig:
        return AioConfig(
            connect_timeout=self._timeout_s,
            read_timeout=self._timeout_s,
            # One retry at most: the deadline of `_call` caps the total.
            retries={"max_attempts": 2, "mode": "standard"},
            signature_version="s3v4",
            # Path-style addressing works with every S3-compatible server,
            # and with a bucket name that has dots.
            s3={"addressing_style": "path"},
        )

    def _key(self, key: str) -> str:
        return self._spec.prefix + key

    async def _call(self, call: Awaitable[T], key: str) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except TimeoutError:
            raise StoreUnavailable(f"{self.location} did not answer in time") from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_CODES:
                raise ObjectMissing(key) from None
            raise StoreUnavailable(f"{self.location}: {code or exc}") from exc
        except (BotoCoreError, OSError) as exc:
            raise StoreUnavailable(f"{self.location}: {exc}") from exc

    async def put(self, key: str, data: bytes) -> None:
        s3 = await self._s3()
        await self._call(
            s3.put_object(
                Bucket=self._spec.bucket,
                Key=self._key(key),
                Body=data,
                ContentType="image/png",
            ),
            key,
        )

    async def get(self, key: str) -> bytes:
        opened = await self.open(key)
        return b"".join([chunk async for chunk in opened.chunks])

    async def open(self, key: str) -> OpenedObject:
        s3 = await self._s3()
        answer = await self._call(
            s3.get_object(Bucket=self._spec.bucket, Key=self._key(key)), key
        )
        return OpenedObject(
            size=int(answer["ContentLength"]),
            chunks=self._chunks(answer["Body"], key),
        )

    async def _chunks(self, body: Any, key: str) -> AsyncIterator[bytes]:
        try:
            while chunk := await self._call(body.read(CHUNK_BYTES), key):
                yield bytes(chunk)
        finally:
            body.close()

    async def delete(self, keys: Sequence[str]) -> None:
        s3 = await self._s3()
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            answer = await self._call(
                s3.delete_objects(
                    Bucket=self._spec.bucket,
                    Delete={
                        "Objects": [{"Key": self._key(key)} for key in batch],
                        "Quiet": True,
                    },
                ),
                batch[0],
            )
            # A missing key is a success; anything else must be retried.
            failed = [
                error
                for error in answer.get("Errors", [])
                if error.get("Code") not in _MISSING_CODES
            ]
            if failed:
                first = failed[0]
                raise StoreUnavailable(
                    f"{self.location}: {len(failed)} deletion(s) failed, "
                    f"first {first.get('Key')}: {first.get('Code')}"
                )

    async def presign(self, key: str, *, filename: str, expires_s: int) -> str | None:
        s3 = await self._s3()
        # Signed locally (no round trip): the deadline only guards the loop.
        return await self._call(
            s3.generate_presigned_url(
                "get_object",
                Params={
                    "Bucket": self._spec.bucket,
                    "Key": self._key(key),
                    "ResponseContentType": "image/png",
                    "ResponseContentDisposition": f'inline; filename="{filename}"',
                    "ResponseCacheControl": f"private, max-age={expires_s}",
                },
                ExpiresIn=expires_s,
            ),
            key,
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

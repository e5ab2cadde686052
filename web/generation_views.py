"""What clients see of generations: the public view, stored images, pages."""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.exceptions import RedisError
from tortoise.expressions import Q

from sdapi.contract.names import (
    image_key,
)
from sdapi.contract.status import Status, Tier
from sdapi.db.models import Delivery, GeneratedImage, Generation, User
from sdapi.db.webhooks import delivery_summary
from sdapi.infra.deadline import Deadline
from sdapi.infra.eta import Eta
from sdapi.infra.links import image_path
from sdapi.infra.object_store import ObjectMissing, StoreUnavailable, sha256_hex
from web.appkeys import redis_key, registry_key, settings_key, stores_key
from web.errors import field_error
from web.eta import LiveState, live_state
from web.schemas import generations as schemas
from web.schemas.webhooks import WebhookState

log = logging.getLogger(__name__)

# PNGs up to this size are hashed on the loop (~0.1 ms); larger ones in a
# thread.
INLINE_HASH_BYTES = 256 * 1024


def image_url(app: web.Application, generation_id: uuid.UUID | str, index: int) -> str:
    """Absolute URL of one image (needs the owner's credentials)."""
    return app[settings_key].base_url + image_path(generation_id, index)


def eta_fields(eta: Eta | None) -> tuple[float | None, schemas.EtaParts | None]:
    """`eta_s` and `eta` of a view or frame, to a tenth of a second."""
    if eta is None:
        return None, None
    wait_s, run_s = round(eta.wait_s, 1), round(eta.run_s, 1)
    return round(wait_s + run_s, 1), schemas.EtaParts(wait_s=wait_s, run_s=run_s)


@dataclass(frozen=True)
class StoredImage:
    """A stored image without its PNG (listing never loads the bytes)."""

    generation_id: uuid.UUID
    index: int
    seed: int
    width: int
    height: int
    sha256: str
    # Where its PNG is (sdapi.db.image_store).
    store: str
    object_key: str
    size: int


_IMAGE_FIELDS = (
    "generation_id",
    "index",
    "seed",
    "width",
    "height",
    "sha256",
    "store",
    "object_key",
    "size",
)


async def stored_images(
    generation_ids: Iterable[uuid.UUID],
) -> dict[uuid.UUID, list[StoredImage]]:
    """The stored images of each generation, by index (no PNG bytes)."""
    ids = list(generation_ids)
    found: dict[uuid.UUID, list[StoredImage]] = {}
    if not ids:
        return found
    rows = (
        await GeneratedImage.filter(generation_id__in=ids)
        .order_by("generation_id", "index")
        .values(*_IMAGE_FIELDS)
    )
    for row in rows:
        image = StoredImage(**row)
        found.setdefault(image.generation_id, []).append(image)
    return found


async def stored_image(generation_id: uuid.UUID, index: int) -> StoredImage | None:
    """One stored image without its PNG, or None while it is not stored."""
    rows = await GeneratedImage.filter(generation_id=generation_id, index=index).values(
        *_IMAGE_FIELDS
    )
    return StoredImage(**rows[0]) if rows else None


async def node_copy(redis: Redis, generation_id: uuid.UUID, index: int) -> bytes | None:
    """The node's copy of an image in Redis (kept there until `jobs` has
    stored it, and a day at least); None if it is gone or Redis is down."""
    try:
        data: bytes | None = await redis.get(image_key(generation_id, index))
    except RedisError:
        log.warning("image %d of %s: Redis unreachable", index, generation_id)
        return None
    return data


async def image_png(
    app: web.Application, generation_id: uuid.UUID, index: int
) -> bytes | None:
    """One image's PNG: from the image store once stored, else the node's copy
    in Redis; None if neither has it. A store that is down or lost the object
    falls back to the node's copy while Redis has it (a just-made image),
    else raises StoreUnavailable or ObjectMissing."""
    stored = await stored_image(generation_id, index)
    if stored is None:
        return await node_copy(app[redis_key], generation_id, index)
    try:
        return await app[stores_key].read(stored.store, stored.object_key)
    except (StoreUnavailable, ObjectMissing):
        data = await node_copy(app[redis_key], generation_id, index)
        if data is None:
            raise
        return data


async def event_png(
    app: web.Application, generation_id: uuid.UUID, index: int, sha256: str
) -> bytes | None:
    """The PNG an `image` event names (its SHA-256): the node's copy in Redis
    when it is that PNG, else `image_png`'s. A just-made image is relayed
    without waiting on the database, and never as bytes the event does not
    name."""
    data = await node_copy(app[redis_key], generation_id, index)
    if data is not None:
        # hashlib lets go of the GIL: a large PNG is hashed off the loop.
        digest = (
            sha256_hex(data)
            if len(data) <= INLINE_HASH_BYTES
            else await asyncio.to_thread(sha256_hex, data)
        )
        if digest == sha256:
            return data
    return await image_png(app, generation_id, index)


async def read_pngs(app: web.Application, images: Iterable[StoredImage]) -> list[bytes]:
    """The PNGs of stored images, from their stores."""
    return await app[stores_key].read_all(
        (image.store, image.object_key) for image in images
    )


def error_ref(generation: Generation) -> schemas.ErrorRef | None:
    """The public error of a generation row, if it has one."""
    if not generation.error_code:
        return None
    return schemas.ErrorRef(
        code=generation.error_code, message=generation.error_message or ""
    )


async def present(
    app: web.Application,
    generation: Generation,
    images: list[StoredImage] | None = None,
    *,
    deadline: Deadline,
    live: LiveState | None = None,
) -> schemas.GenerationView:
    """The public view of a generation, with live queue position, progress
    and estimated time as far as Redis answers within `deadline` (or as
    `live` gives them, when the caller has just learned them)."""
    if images is None:
        images = (await stored_images([generation.id])).get(generation.id, [])
    if live is None:
        live = await live_state(app, generation, deadline)
    eta_s, eta = eta_fields(live.eta)
    return schemas.GenerationView(
        id=str(generation.id),
        status=Status(generation.status),
        tier=Tier(generation.tier),
        request=schemas.ResolvedRequest.model_validate(generation.request),
        created_at=generation.created_at,
        scheduled_for=generation.scheduled_for,
        started_at=generation.started_at,
        finished_at=generation.finished_at,
        queue_position=live.position,
        waiting_for_node=Status(generation.status) is Status.QUEUED
        and app[registry_key].serves(generation.model) is False,
        progress=None
        if live.progress is None
        else schemas.Progress(step=live.progress.step, total=live.progress.total),
        eta_s=eta_s,
        eta=eta,
        images=[
            schemas.ImageRef(
                index=image.index,
                seed=image.seed,
                url=image_url(app, generation.id, image.index),
                width=image.width,
                height=image.height,
            )
            for image in images
        ],
        error=error_ref(generation),
        delivery=Delivery(generation.delivery).value,
        emailed_at=generation.emailed_at,
        warnings=[
            schemas.Notice.model_validate(note) for note in generation.warnings or []
        ],
        webhook=await _webhook(generation),
    )


async def _webhook(generation: Generation) -> WebhookState | None:
    summary = await delivery_summary(generation)
    return None if summary is None else WebhookState.model_validate(summary)


def encode_cursor(generation: Generation) -> str:
    """An opaque cursor after `generation` in newest-first order."""
    raw = f"{generation.created_at.isoformat()}|{generation.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """Inverse of `encode_cursor`; 422 for anything else."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, _, ident = base64.urlsafe_b64decode(padded).decode().partition("|")
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        # In UTC here: a time near datetime.min in another zone overflows.
        return when.astimezone(UTC), uuid.UUID(ident)
    except (ValueError, UnicodeDecodeError, OverflowError):
        raise field_error("before", "Not a cursor this API returned.") from None


async def list_own(
    user: User, limit: int, before: str | None
) -> tuple[list[Generation], str | None]:
    """A page of the user's generations, newest first, and the next cursor."""
    query = Generation.filter(user_id=user.id)
    if before is not None:
        when, ident = decode_cursor(before)
        # Keyset pagination on (created_at, id): stable under concurrent inserts.
        query = query.filter(Q(created_at__lt=when) | Q(created_at=when, id__lt=ident))
    rows = list(await query.order_by("-created_at", "-id").limit(limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1]) if more and rows else None


def image_headers(image: StoredImage) -> dict[str, Any]:
    """Headers of a stored image's download: immutable content, private cache."""
    filename = f"{image.generation_id}-{image.index}.png"
    return {
        "Content-Type": "image/png",
        "Cache-Control": "private, max-age=31536000, immutable",
        "ETag": f'"{image.sha256}"',
        "Content-Disposition": f'inline; filename="{filename}"',
    }

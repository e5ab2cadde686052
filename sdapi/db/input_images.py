"""Keeping a generation's input images, and handing them to GPU nodes.

Inputs are stored once per user and content (PostgreSQL is the truth) and
copied into Redis under their hash whenever work that needs them is
enqueued, so a job payload names them and a node fetches them. `jobs`
imports this module too (no aiohttp): it re-puts inputs when it enqueues.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Protocol

from redis.asyncio import Redis

from sdapi.contract.names import INPUT_TTL_S, input_key
from sdapi.db.models import Generation, GenerationInput, InputImage, InputRole, User


class Cleaned(Protocol):
    """A checked input image (`web.uploads.CleanImage`)."""

    @property
    def data(self) -> bytes: ...
    @property
    def sha256(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...


async def store_inputs(
    user: User, generation: Generation, inputs: Mapping[InputRole, Cleaned]
) -> None:
    """Keep a generation's inputs (inside its submit transaction)."""
    for role, image in inputs.items():
        # The user's row is locked by the caller: no concurrent insert races.
        stored = await InputImage.get_or_none(user_id=user.id, sha256=image.sha256)
        if stored is None:
            stored = await InputImage.create(
                id=uuid.uuid4(),
                user=user,
                sha256=image.sha256,
                data=image.data,
                width=image.width,
                height=image.height,
            )
        await GenerationInput.create(
            id=uuid.uuid4(), generation=generation, role=role.value, image=stored
        )


async def put_inputs(redis: Redis, generation_ids: Iterable[uuid.UUID]) -> int:
    """Copy the inputs of these generations into Redis for the node; how many."""
    ids = list(generation_ids)
    if not ids:
        return 0
    rows = await GenerationInput.filter(generation_id__in=ids).values_list(
        "image__sha256", "image__data"
    )
    found = {str(digest): bytes(data) for digest, data in rows}
    for digest, data in found.items():
        await redis.set(input_key(digest), data, ex=INPUT_TTL_S)
    return len(found)

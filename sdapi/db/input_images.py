"""Keeping a generation's input images, and handing them to GPU nodes.

Inputs are stored once per user and content: the row in PostgreSQL, the bytes
in the image store (sdapi.db.image_store). Whenever work that needs them is
enqueued they are copied into Redis under their hash, so a job payload names
them and a node fetches them there: nodes never hold storage credentials.
`jobs` imports this module too (no aiohttp): it re-puts inputs when it
enqueues.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

from sdapi.contract.names import INPUT_TTL_S, input_key
from sdapi.db.image_store import ImageStores, StoredObject
from sdapi.db.models import Generation, GenerationInput, InputImage, InputRole, User
from sdapi.infra.object_store import input_object_key


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


@dataclass(frozen=True)
class PreparedInput:
    """An input ready to be linked in the submit transaction: `written` is the
    object of a new row, None where the user already had the image."""

    image: Cleaned
    image_id: uuid.UUID
    written: StoredObject | None


class InputsChanged(Exception):
    """An input found before the transaction was deleted (the clean-up) before
    the transaction locked the user: prepare again."""


async def write_new_inputs(
    stores: ImageStores, user_id: uuid.UUID, inputs: Mapping[InputRole, Cleaned]
) -> dict[InputRole, PreparedInput]:
    """Write the inputs the user does not have yet to the image store.

    Outside the submit transaction: ImageStores.write must commit its queued
    deletion before the object exists, and an upload to a slow store must not
    hold the user's row lock. An object whose row then never commits (the
    submit refused, a concurrent twin won) is deleted a day later.
    """
    prepared: dict[InputRole, PreparedInput] = {}
    for role, image in inputs.items():
        known = await InputImage.filter(user_id=user_id, sha256=image.sha256).first()
        if known is not None:
            prepared[role] = PreparedInput(image, known.id, None)
            continue
        image_id = uuid.uuid4()
        written = await stores.write(input_object_key(user_id, image_id), image.data)
        prepared[role] = PreparedInput(image, image_id, written)
    return prepared


async def store_inputs(
    user: User, generation: Generation, inputs: Mapping[InputRole, PreparedInput]
) -> None:
    """Keep a generation's prepared inputs (inside its submit transaction);
    InputsChanged if one found by `write_new_inputs` has gone since."""
    for role, prepared in inputs.items():
        image = prepared.image
        # The user's row is locked by the caller: no concurrent insert races.
        stored = await InputImage.get_or_none(user_id=user.id, sha256=image.sha256)
        if stored is None:
            written = prepared.written
            if written is None:
                raise InputsChanged(role.value)
            stored = await InputImage.create(
                id=prepared.image_id,
                user=user,
                sha256=image.sha256,
                store=written.store,
                object_key=written.object_key,
                size=written.size,
                width=image.width,
                height=image.height,
            )
        await GenerationInput.create(
            id=uuid.uuid4(), generation=generation, role=role.value, image=stored
        )


async def put_input_data(redis: Redis, images: Iterable[Cleaned]) -> None:
    """Put inputs whose bytes are at hand (a submit) into Redis for the node."""
    async with redis.pipeline(transaction=False) as pipe:
        for image in images:
            pipe.set(input_key(image.sha256), image.data, ex=INPUT_TTL_S)
        await pipe.execute()


async def put_inputs(
    redis: Redis, stores: ImageStores, generation_ids: Iterable[uuid.UUID]
) -> int:
    """Copy the inputs of these generations from the image store into Redis
    for the node; how many. StoreUnavailable while the store is down."""
    ids = list(generation_ids)
    if not ids:
        return 0
    rows = await GenerationInput.filter(generation_id__in=ids).values_list(
        "image__sha256", "image__store", "image__object_key"
    )
    found = {str(digest): (str(store), str(key)) for digest, store, key in rows}
    datas = await stores.read_all(found.values())
    async with redis.pipeline(transaction=False) as pipe:
        for digest, data in zip(found, datas, strict=True):
            pipe.set(input_key(digest), data, ex=INPUT_TTL_S)
        await pipe.execute()
    return len(found)

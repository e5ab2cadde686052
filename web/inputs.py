"""Input images of a request: from base64, file parts or earlier results, checked."""

from __future__ import annotations

import asyncio
import base64
import binascii
import uuid
from dataclasses import dataclass
from functools import partial

from sdapi.db.image_store import ImageStores
from sdapi.db.models import GeneratedImage, User
from web.decoders import DecodePool
from web.errors import ValidationFailed
from web.settings import TierLimits
from web.uploads import CleanImage, Use, clean_image, inspect_image


@dataclass(frozen=True)
class ResultRef:
    """`{"generation_id", "index"}`: one of the user's own earlier images."""

    generation_id: uuid.UUID
    index: int


# What a client sent for one input: raw file bytes, base64 text, or a reference.
Source = bytes | str | ResultRef


def _refuse(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(message, details=[{"field": field, "message": message}])


def decode_base64(text: str, field: str) -> bytes:
    """Bytes of a base64 image, with or without a `data:` URL prefix (422 if bad)."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise _refuse(field, "A data: URL must be base64-encoded.")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _refuse(field, "Not valid base64.") from None


async def _own_result(
    user: User, ref: ResultRef, field: str, stores: ImageStores
) -> bytes:
    rows = await GeneratedImage.filter(
        generation_id=ref.generation_id,
        index=ref.index,
        generation__user_id=user.id,
    ).values_list("store", "object_key")
    if not rows:
        # The same answer for someone else's image: never reveal it exists.
        raise _refuse(field, "No such image among your generations.")
    store, key = rows[0]
    return await stores.read(store, key)


async def resolve_input(
    user: User,
    source: Source,
    *,
    field: str,
    use: Use,
    limits: TierLimits,
    decoders: DecodePool,
    stores: ImageStores,
    keep_alpha: bool = False,
) -> CleanImage:
    """One input, checked and cleaned, whatever form it came in: its header in
    a thread, then (if it passed) its pixels in one of the user's decode slots."""
    if isinstance(source, ResultRef):
        data = await _own_result(user, source, field, stores)
    elif isinstance(source, str):
        data = decode_base64(source, field)
    else:
        data = source
    # Refused here, a huge declared size never takes a decode slot.
    await asyncio.to_thread(
        inspect_image,
        data,
        field=field,
        max_bytes=limits.max_upload_bytes,
        max_pixels=limits.max_upload_pixels,
    )
    return await decoders.run(
        user.id,
        partial(
            clean_image,
            data,
            field=field,
            use=use,
            max_bytes=limits.max_upload_bytes,
            max_pixels=limits.max_upload_pixels,
            keep_alpha=keep_alpha,
        ),
    )


def check_mask_size(image: CleanImage, mask: CleanImage) -> None:
    """422 unless the mask has the image's size."""
    if (image.width, image.height) != (mask.width, mask.height):
        raise _refuse(
            "mask",
            f"The mask is {mask.width}x{mask.height}; it must be the image's "
            f"size, {image.width}x{image.height}.",
        )

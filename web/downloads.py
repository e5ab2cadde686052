"""Sending a stored image: streamed from its store, or a redirect to it.

With SDAPI_STORAGE_REDIRECT=true a store that can presign (S3) answers with a
302 to a URL that works for SDAPI_STORAGE_PRESIGN_S seconds, so the bytes
never pass through web; the route has checked the caller first (the owner, or
a signed link made for the owner), and the URL is given to no one else. Every
other store, and the default, streams: web holds one small buffer, not the
image, and no database connection while it sends.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

from aiohttp import web

from sdapi.infra.object_store import StoreUnavailable
from web.appkeys import settings_key, stores_key
from web.generation_views import StoredImage, image_headers

log = logging.getLogger(__name__)


async def send_image(request: web.Request, image: StoredImage) -> web.StreamResponse:
    """The download of a stored image. StoreUnavailable (a 503) or ObjectMissing
    (a 410) before anything is sent; a store failing mid-body cuts the
    connection, so the client sees a short body, never a wrong one."""
    settings = request.app[settings_key]
    store = request.app[stores_key].at(image.store)
    headers = image_headers(image)
    if settings.storage_redirect:
        url = await store.presign(
            image.object_key,
            filename=f"{image.generation_id}-{image.index}.png",
            expires_s=settings.storage_presign_s,
        )
        if url is not None:
            # The URL expires in minutes: neither it nor this answer is cached.
            return web.Response(
                status=302,
                headers={
                    "Location": url,
                    "Cache-Control": "no-store",
                    "ETag": headers["ETag"],
                },
            )
    opened = await store.open(image.object_key)
    response = web.StreamResponse(headers=headers)
    response.content_length = opened.size
    chunks = opened.chunks
    try:
        await response.prepare(request)
        async for chunk in chunks:
            await response.write(chunk)
    except StoreUnavailable:
        log.warning(
            "image %d of %s: the store failed mid-download",
            image.index,
            image.generation_id,
        )
        if request.transport is not None:
            request.transport.close()
        return response
    finally:
        # A body left unread (the client gone) releases its connection now.
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()
    await response.write_eof()
    return response

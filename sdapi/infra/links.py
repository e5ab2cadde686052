"""Links to images that work from an email: signed and expiring, no login needed."""

from __future__ import annotations

import hashlib
import hmac
import time
from uuid import UUID

# How long a download link in an email works, in seconds.
LINK_TTL_S = 30 * 24 * 3600


def image_path(generation_id: UUID | str, index: int) -> str:
    """The API path of one image."""
    return f"/api/v1/generations/{generation_id}/images/{index}"


def _signature(secret: str, path: str, expires: int) -> str:
    message = f"{path}\n{expires}".encode()
    key = hashlib.sha256(b"sdapi image links\n" + secret.encode()).digest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def signed_image_url(
    secret: str,
    base_url: str,
    generation_id: UUID | str,
    index: int,
    *,
    now: float | None = None,
    ttl_s: int = LINK_TTL_S,
) -> str:
    """An absolute image URL carrying `expires` and `signature` query parameters."""
    path = image_path(generation_id, index)
    expires = int((now if now is not None else time.time()) + ttl_s)
    signature = _signature(secret, path, expires)
    return f"{base_url}{path}?expires={expires}&signature={signature}"


def link_is_valid(
    secret: str, path: str, expires: int, signature: str, *, now: float | None = None
) -> bool:
    """Whether a signed link for `path` is genuine and not expired."""
    if expires < (now if now is not None else time.time()):
        return False
    # Compared as bytes: compare_digest refuses str with non-ASCII characters.
    return hmac.compare_digest(
        _signature(secret, path, expires).encode(),
        signature.encode("utf-8", "surrogatepass"),
    )

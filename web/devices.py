"""Device cookies: a browser that signed in to an account before is known.

OWASP's answer to lockouts that others can trigger: sign-ins that carry a
valid device cookie for the account are counted per device, not against the
client's or the account's limits, so an attacker guessing from elsewhere never
holds the owner back. The cookie is an HMAC-signed
`<user id>.<device id>.<expires>.<mac>`; the MAC also covers the account's
email key, so it is only good for the account it was issued for. Nothing is
stored server-side: a reset does not need to find the cookies to lift their
limits (see web.throttle.lift).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

from aiohttp import web

DEVICE_COOKIE = "sdapi_device"
# Sent with sign-ins only: no other request needs it.
DEVICE_COOKIE_PATH = "/api/v1/auth/signin"


@dataclass(frozen=True)
class Device:
    """A browser that signed in to `user_id` before."""

    user_id: uuid.UUID
    device_id: str


def _key(secret_key: str) -> bytes:
    """The cookie's signing key, separated from other uses of the secret key."""
    return hashlib.sha256(b"sdapi device cookie v1\n" + secret_key.encode()).digest()


def _mac(secret_key: str, email_key: str, payload: str) -> str:
    digest = hmac.new(
        _key(secret_key), f"{payload}\n{email_key}".encode(), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def device_cookie_value(
    secret_key: str, email_key: str, device: Device, expires_at: int
) -> str:
    """The signed cookie value naming `device`, good until `expires_at` (Unix s)."""
    payload = f"{device.user_id}.{device.device_id}.{expires_at}"
    return f"{payload}.{_mac(secret_key, email_key, payload)}"


def read_device(
    value: str | None, *, secret_key: str, email_key: str, now: float
) -> Device | None:
    """The device a cookie names, if it is signed by us for `email_key` and
    has not expired; None for anything else."""
    if not value:
        return None
    parts = value.split(".")
    if len(parts) != 4:
        return None
    user_id, device_id, expires, mac = parts
    payload = f"{user_id}.{device_id}.{expires}"
    # As bytes: compare_digest refuses str with non-ASCII characters, which a
    # forged cookie may well hold.
    expected = _mac(secret_key, email_key, payload).encode()
    if not hmac.compare_digest(mac.encode("utf-8", "surrogatepass"), expected):
        return None
    try:
        if int(expires) <= now:
            return None
        return Device(user_id=uuid.UUID(user_id), device_id=device_id)
    except ValueError:
        return None


def new_device(user_id: uuid.UUID) -> Device:
    """A browser's first device identity with `user_id`."""
    return Device(user_id=user_id, device_id=secrets.token_urlsafe(16))


def set_device_cookie(
    response: web.StreamResponse,
    value: str,
    *,
    max_age: int,
    secure: bool,
) -> None:
    """Hand the browser its device cookie: HttpOnly, for sign-ins only."""
    response.set_cookie(
        DEVICE_COOKIE,
        value,
        max_age=max_age,
        path=DEVICE_COOKIE_PATH,
        httponly=True,
        secure=secure,
        samesite="Strict",
    )

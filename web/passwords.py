"""Password hashing: NFKC, a keyed HMAC-SHA256 pre-hash, then bcrypt in a thread.

Why the pre-hash (bcrypt's 72 bytes, a stolen database) is explained in
docs/ARCHITECTURE.md ("Passwords").
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import unicodedata

import bcrypt

log = logging.getLogger(__name__)

SCHEME_V1 = "sdapi1$"  # NFKC + HMAC-SHA256(secret-derived key) + base64, bcrypt 2b
# A valid bcrypt salt (from bcrypt.gensalt): unknown emails are checked against
# a hash of this salt at the configured cost, so they take as long as known ones.
_DUMMY_SALT = "CUvZYCHdgBvTJuSVhyyqWu"


def _pepper(secret_key: str) -> bytes:
    """The pre-hash key, separated from other uses of the secret key."""
    label = b"sdapi password pre-hash v1\n"
    return hashlib.sha256(label + secret_key.encode()).digest()


def prehash(password: str, secret_key: str) -> bytes:
    """The 44 ASCII bytes bcrypt sees for `password` (scheme v1)."""
    normalized = unicodedata.normalize("NFKC", password)
    digest = hmac.new(
        _pepper(secret_key), normalized.encode("utf-8"), hashlib.sha256
    ).digest()
    return base64.b64encode(digest)


def _hash_sync(password: str, secret_key: str, rounds: int) -> str:
    hashed = bcrypt.hashpw(prehash(password, secret_key), bcrypt.gensalt(rounds))
    return SCHEME_V1 + hashed.decode("ascii")


def _verify_sync(password: str, stored: str, secret_key: str) -> bool:
    if not stored.startswith(SCHEME_V1):
        log.warning("password hash with an unknown scheme; refusing it")
        return False
    hashed = stored.removeprefix(SCHEME_V1).encode("ascii")
    try:
        return bcrypt.checkpw(prehash(password, secret_key), hashed)
    except ValueError:
        log.warning("malformed bcrypt hash in the database; refusing it")
        return False


def _burn_sync(password: str, secret_key: str, rounds: int) -> None:
    salt = f"$2b${rounds:02d}${_DUMMY_SALT}".encode("ascii")
    bcrypt.hashpw(prehash(password, secret_key), salt)


async def hash_password(password: str, *, secret_key: str, rounds: int) -> str:
    """The hash to store for `password` (bcrypt cost `rounds`, in a thread)."""
    return await asyncio.to_thread(_hash_sync, password, secret_key, rounds)


async def verify_password(password: str, stored: str, *, secret_key: str) -> bool:
    """Whether `password` matches the stored hash (bcrypt in a thread)."""
    return await asyncio.to_thread(_verify_sync, password, stored, secret_key)


async def verify_unknown(password: str, *, secret_key: str, rounds: int) -> bool:
    """Spend what a real check costs, for an email with no account; always False.

    Without it a wrong email answers ~`bcrypt time` faster than a wrong
    password, which tells an attacker which emails have accounts.
    """
    await asyncio.to_thread(_burn_sync, password, secret_key, rounds)
    return False


def needs_rehash(stored: str, *, rounds: int) -> bool:
    """Whether a hash that just verified should be stored again (older scheme/cost)."""
    if not stored.startswith(SCHEME_V1):
        return True
    # "$2b$12$...": the cost sits between the second and third "$".
    parts = stored.removeprefix(SCHEME_V1).split("$")
    return len(parts) < 4 or parts[2] != f"{rounds:02d}"


class Passwords:
    """The app's password hashing: its secret key, cost, and a bound on how many
    bcrypt runs happen at once (the rest wait their turn on the loop, holding
    no thread)."""

    def __init__(self, *, secret_key: str, rounds: int, concurrency: int) -> None:
        self._secret_key = secret_key
        self._rounds = rounds
        self._slots = asyncio.Semaphore(concurrency)

    async def hash(self, password: str) -> str:
        """The hash to store for `password`."""
        async with self._slots:
            return await hash_password(
                password, secret_key=self._secret_key, rounds=self._rounds
            )

    async def verify(self, password: str, stored: str | None) -> bool:
        """Whether `password` matches `stored`; None (no such account) costs the
        same as a real check and is False."""
        async with self._slots:
            if stored is None:
                return await verify_unknown(
                    password, secret_key=self._secret_key, rounds=self._rounds
                )
            return await verify_password(password, stored, secret_key=self._secret_key)

    def needs_rehash(self, stored: str) -> bool:
        """Whether a hash that just verified should be stored again."""
        return needs_rehash(stored, rounds=self._rounds)

"""Premium time: single-use codes (made by an operator, redeemed by users) and grants.

A code is `SDAPI-XXXXX-XXXXX-XXXXX-XXXXX`: 20 base32 characters, 100 random
bits. Only the SHA-256 of its canonical form is stored. Users may type it in
any case, with or without the prefix, dashes or spaces, and with 0/1/8 for the
letters O/I/B that base32 uses instead.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from datetime import datetime, timedelta
from uuid import UUID

from sdapi.db.models import User

CODE_PREFIX = "SDAPI"
CODE_GROUPS = 4
GROUP_LENGTH = 5
CODE_LENGTH = CODE_GROUPS * GROUP_LENGTH  # base32 characters, 5 bits each
# Longer grants than this are a typo (and would overflow dates).
MAX_DAYS = 36500

_BASE32 = re.compile(r"[A-Z2-7]+")
_LOOKALIKES = str.maketrans({"0": "O", "1": "I", "8": "B"})


def new_code() -> str:
    """A fresh human-friendly code (100 random bits)."""
    raw = base64.b32encode(secrets.token_bytes(CODE_LENGTH * 5 // 8)).decode("ascii")
    groups = [raw[i : i + GROUP_LENGTH] for i in range(0, CODE_LENGTH, GROUP_LENGTH)]
    return "-".join([CODE_PREFIX, *groups])


def canonical_code(text: str) -> str | None:
    """The 20 base32 characters of a code as typed, or None if it cannot be one."""
    compact = re.sub(r"[\s\-_]", "", text).upper()
    compact = compact.removeprefix(CODE_PREFIX).translate(_LOOKALIKES)
    if len(compact) != CODE_LENGTH or not _BASE32.fullmatch(compact):
        return None
    return compact


def code_hash(canonical: str) -> str:
    """What the database stores for a canonical code (SHA-256 hex; 100 bits needs
    no slow hash)."""
    return hashlib.sha256(f"sdapi premium code\n{canonical}".encode()).hexdigest()


def extended_until(current: datetime | None, days: int, now: datetime) -> datetime:
    """Premium end after adding `days` to whatever premium time is left at `now`."""
    start = current if current is not None and current > now else now
    return start + timedelta(days=days)


async def add_premium_days(user_id: UUID, days: int, now: datetime) -> User:
    """Add `days` of premium to a user; call inside a transaction.

    The user row is locked so concurrent grants (two codes, an operator) add up
    instead of overwriting each other.
    """
    user = await User.select_for_update().get(id=user_id)
    user.premium_until = extended_until(user.premium_until, days, now)
    await user.save(update_fields=["premium_until"])
    return user

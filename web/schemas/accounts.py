"""Public models of the accounts API: sign-up, sign-in, `/me`, premium codes."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import email_validator
from pydantic import BaseModel, ConfigDict, EmailStr, Field, field_validator

from sdapi.contract.status import Tier
from sdapi.db.models import User as UserRow
from web.schemas.base import RequestModel
from web.settings import TierLimits

PASSWORD_MIN = 10
PASSWORD_MAX = 256

Password = Annotated[
    str,
    Field(
        min_length=PASSWORD_MIN,
        max_length=PASSWORD_MAX,
        description=f"{PASSWORD_MIN} to {PASSWORD_MAX} characters; every one counts.",
    ),
]


def _any_case(name: str) -> str:
    # JSON Schema's regular expressions have no case-insensitive flag.
    return "".join(
        f"[{char.upper()}{char}]" if char.isalpha() else re.escape(char)
        for char in name.lower()
    )


# email-validator (behind EmailStr) refuses addresses at the special-use
# domains of RFC 6761 (`.test`, `.localhost`, ...): no mail reaches them. The
# pattern publishes that rule; EmailStr enforces it, with its own message.
_RESERVED = "|".join(map(_any_case, email_validator.SPECIAL_USE_DOMAIN_NAMES))
DELIVERABLE_EMAIL = rf"^[^@]+@(?!(?:[^@]*\.)?(?:{_RESERVED})\.?$)"

Email = Annotated[EmailStr, Field(json_schema_extra={"pattern": DELIVERABLE_EMAIL})]


def plain_name(text: str) -> str:
    """`text` without control, format (bidi overrides, zero-width) or line and
    paragraph separator characters, its spaces collapsed: a name shows as
    what it is wherever it appears."""
    kept = "".join(
        " " if unicodedata.category(char) in {"Zl", "Zp", "Cc"} else char
        for char in text
        if unicodedata.category(char) not in {"Cf", "Co", "Cs", "Cn"}
    )
    return " ".join(kept.split())


def optional_name(value: str | None) -> str | None:
    """A name as stored: plain text (see `plain_name`), None when nothing is left."""
    if value is None:
        return None
    return plain_name(value) or None


class SignupRequest(RequestModel):
    email: Email
    password: Password
    name: str | None = Field(default=None, max_length=100)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return optional_name(value)


class MeUpdate(RequestModel):
    """Only the fields sent change."""

    name: str | None = Field(
        default=None,
        max_length=100,
        description="The name shown for the account; null or empty removes it.",
    )
    email: EmailStr | None = Field(
        default=None,
        description="A new address: it is sent a verification link, and the "
        "account's address changes only when that link is opened (the old one "
        "keeps working until then).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return optional_name(value)


class SigninRequest(RequestModel):
    email: Email
    # Only the length bound: a wrong password gets the same 401 as any other.
    password: str = Field(min_length=1, max_length=PASSWORD_MAX)
    session: bool = Field(
        default=False,
        description="Also start a playground session: sets an HttpOnly session "
        "cookie and returns `csrf_token`, to send as X-CSRF-Token on unsafe "
        "cookie-authenticated requests.",
    )


class RedeemRequest(RequestModel):
    code: str = Field(
        min_length=1,
        max_length=100,
        description="A premium code such as SDAPI-XXXXX-XXXXX-XXXXX-XXXXX "
        "(case, dashes and spaces do not matter).",
    )


class VerifyQuery(RequestModel):
    token: str = Field(
        min_length=1, max_length=200, description="The token from the email's link."
    )


class UserView(BaseModel):
    """An account as its owner sees it."""

    model_config = ConfigDict(title="User")

    id: UUID
    email: str
    name: str | None
    tier: Tier
    premium_until: datetime | None
    email_verified: bool
    created_at: datetime

    @classmethod
    def of(cls, user: UserRow, now: datetime) -> UserView:
        """The public view of a user row at `now`."""
        return cls(
            id=user.id,
            email=user.email,
            name=user.name,
            tier=user.tier_at(now),
            premium_until=user.premium_until,
            email_verified=user.email_verified_at is not None,
            created_at=user.created_at,
        )


class SignupResponse(BaseModel):
    user: UserView


class VerifyResponse(BaseModel):
    user: UserView


class ResendRequest(RequestModel):
    email: Email | None = Field(
        default=None,
        description="Without credentials: the address to send a new link to "
        "(the answer is the same whether or not it has an account).",
    )


class VerificationSent(BaseModel):
    """A new verification email is in the outbox (or, asked by address, may be)."""

    sent: Literal[True] = True
    email: str | None = Field(
        default=None, description="Where it goes (signed in only)."
    )
    expires_at: datetime | None = Field(
        default=None, description="When its link stops working (signed in only)."
    )


class SigninResponse(BaseModel):
    token: str = Field(
        description="Send as `Authorization: Bearer <token>`. With `session: "
        "true` it is the session's own token: it expires with the session, and "
        "signing out with either the token or the cookie ends both."
    )
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (a scheme name)
    expires_at: datetime
    user: UserView
    csrf_token: str | None = Field(
        default=None,
        description="Only with `session: true`: the session's CSRF token.",
    )


class Quota(BaseModel):
    """What the caller's tier allows and how much of it is in use."""

    images_today: int = Field(description="Images requested today (UTC).")
    images_per_day: int
    in_flight: int = Field(description="Premium requests queued or running now.")
    max_in_flight: int | None = Field(
        description="null: not limited (normal requests are bounded per day only)."
    )
    max_upload_bytes: int = Field(description="Largest input image file.")
    max_upload_pixels: int = Field(description="Most pixels of an input image.")

    @classmethod
    def of(cls, limits: TierLimits, *, images_today: int, in_flight: int) -> Quota:
        """The quota view of a tier's limits and current usage."""
        return cls(
            images_today=images_today,
            images_per_day=limits.images_per_day,
            in_flight=in_flight,
            max_in_flight=limits.max_in_flight,
            max_upload_bytes=limits.max_upload_bytes,
            max_upload_pixels=limits.max_upload_pixels,
        )


class Me(UserView):
    """The caller's account with their quota."""

    # Not UserView's title: its schema would take the name `User` as well.
    model_config = ConfigDict(title="Me")

    quota: Quota
    pending_email: str | None = Field(
        default=None,
        description="A new address waiting for its verification link to be "
        "opened; the account's `email` changes then.",
    )

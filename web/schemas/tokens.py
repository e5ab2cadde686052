"""Models of the personal API token endpoints."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from web.schemas.base import RequestModel


class TokenCreate(RequestModel):
    name: str = Field(
        min_length=1,
        max_length=100,
        description="What the token is for, e.g. `laptop script`.",
    )
    expires_at: datetime | None = Field(
        default=None,
        description="When it stops working (at most a few years ahead); "
        "a year from now when absent.",
    )


class Token(BaseModel):
    """A token as listed: never its secret."""

    id: str
    name: str = Field(description="Its name; `sign-in` for tokens from sign-in.")
    created_at: datetime
    last_used_at: datetime | None = Field(description="To the minute.")
    expires_at: datetime


class TokenList(BaseModel):
    items: list[Token]


class NewToken(Token):
    """A token just made; `token` is the secret, shown this once."""

    token: str = Field(description="The bearer secret; it is not shown again.")

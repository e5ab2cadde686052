"""The base of every model a client sends: unknown fields refused, text storable.

PostgreSQL's text cannot hold NUL, and a lone surrogate cannot be encoded at
all; either reached the database as a 500. Every request model derives from
`RequestModel`, so every text field of every route refuses them with a 422
naming the field (tests/web/test_request_models.py keeps it so).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


def storable(value: Any) -> Any:
    """`value` unchanged if every string in it can be stored; ValueError if not."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    "must be valid Unicode text (it holds a lone surrogate)"
                ) from None
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            storable(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            storable(key)
            storable(item)
    return value


class RequestModel(BaseModel):
    """What a client sends: a body, a query, a form or a WebSocket message."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return storable(value)

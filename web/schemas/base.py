"""The base of every model a client sends: unknown fields refused, text storable.

PostgreSQL's text cannot hold NUL, and a lone surrogate cannot be encoded at
all; either reached the database as a 500. Every request model derives from
`RequestModel`, so every text field of every route refuses them with a 422
naming the field (tests/web/test_request_models.py keeps it so), and its
published schema says so: a pattern without NUL on each free text field.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

# JSON Schema patterns search: this one holds for text without a NUL. (A lone
# surrogate has no UTF-8 form, so no JSON encoder sends one by accident.)
NO_NUL = r"^[^\x00]*$"


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


_CONSTRAINED = frozenset({"pattern", "format", "enum", "const"})


def _no_nul_in_text(schema: dict[str, Any]) -> None:
    """Give each free text property of a model's schema the NO_NUL pattern.

    Text with its own pattern, format or choices already excludes NUL; other
    models (`$ref`) get theirs from their own schema.
    """
    for value in schema.get("properties", {}).values():
        for branch in value.get("anyOf", [value]):
            if branch.get("type") == "string" and not _CONSTRAINED & branch.keys():
                branch["pattern"] = NO_NUL


class RequestModel(BaseModel):
    """What a client sends: a body, a query, a form or a WebSocket message."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_no_nul_in_text)

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        return storable(value)

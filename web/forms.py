"""Reading multipart form data with limits: text fields and uploaded files."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web

from web.errors import (
    MALFORMED_BODY_ERRORS,
    BadRequest,
    PayloadTooLarge,
    malformed_body,
    refuse_declared_oversize,
)

# One text field of a form, in bytes (a prompt is at most a few KB).
TEXT_FIELD_MAX = 64 * 1024
FIELDS_MAX = 64
CHUNK = 64 * 1024
# Parts are read as sent; RFC 7578 has senders use no transfer encoding, and
# another one would be read as if it were the data.
PLAIN_TRANSFER_ENCODINGS = frozenset({"", "7bit", "8bit", "binary"})


@dataclass
class Form:
    """A form's text fields and file parts (each file's raw bytes)."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


def is_form(request: web.Request) -> bool:
    """Whether the body is multipart form data."""
    return request.content_type == "multipart/form-data"


async def _read_part(part: BodyPartReader, limit: int, name: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(CHUNK):
        data += chunk
        if len(data) > limit:
            raise PayloadTooLarge(
                f"{name} is over {limit} bytes.",
                details=[{"field": name, "message": f"At most {limit} bytes."}],
            )
    return bytes(data)


async def read_form(
    request: web.Request, *, file_fields: frozenset[str], max_file_bytes: int
) -> Form:
    """The form's parts; file parts (with a filename) only under `file_fields`."""
    if not is_form(request):
        raise BadRequest("Send the body as multipart/form-data.")
    refuse_declared_oversize(request)
    form = Form()
    try:
        reader = await request.multipart()
        count = 0
        while (part := await reader.next()) is not None:
            count += 1
            if count > FIELDS_MAX or not isinstance(part, BodyPartReader):
                raise BadRequest("The form has too many or nested parts.")
            encoding = part.headers.get("Content-Transfer-Encoding", "")
            if encoding.strip().lower() not in PLAIN_TRANSFER_ENCODINGS:
                raise BadRequest("Send form parts without a Content-Transfer-Encoding.")
            if part.headers.get("Content-Encoding", "identity").lower() != "identity":
                raise BadRequest("Send form parts without a Content-Encoding.")
            name = part.name or ""
            if part.filename is not None:
                if name not in file_fields:
                    raise BadRequest(f"Unexpected file field {name!r}.")
                form.files[name] = await _read_part(part, max_file_bytes, name)
            else:
                raw = await _read_part(part, TEXT_FIELD_MAX, name)
                form.fields[name] = raw.decode("utf-8")
    except (ValueError, UnicodeDecodeError, AssertionError) as exc:
        raise BadRequest(f"The form data is malformed: {exc}.") from None
    except MALFORMED_BODY_ERRORS:
        raise malformed_body() from None
    return form

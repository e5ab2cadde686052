"""Reading multipart form data with limits: text fields and uploaded files."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from web.errors import BadRequest, PayloadTooLarge

# One text field of a form, in bytes (a prompt is at most a few KB).
TEXT_FIELD_MAX = 64 * 1024
FIELDS_MAX = 64
CHUNK = 64 * 1024


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
    form = Form()
    try:
        reader = await request.multipart()
        count = 0
        while (part := await reader.next()) is not None:
            count += 1
            if count > FIELDS_MAX or not isinstance(part, BodyPartReader):
                raise BadRequest("The form has too many or nested parts.")
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
    except HttpProcessingError as exc:
        # A part's headers that do not parse (aiohttp's HTTP parser raises).
        raise BadRequest(f"The form data is malformed: {exc.message}.") from None
    return form

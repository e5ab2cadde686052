"""Checking and cleaning uploaded images (PNG, JPEG, WebP) before anything keeps them.

Formats are recognised by content; sizes are checked from the header before
the pixels are decoded (`inspect_image` does only that); what is kept is a
fresh PNG without any metadata. Decoding is CPU work: call `clean_image` in a
thread, one of `web.decoders`'.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from enum import StrEnum

from PIL import Image, ImageOps, UnidentifiedImageError

from web.errors import PayloadTooLarge, ValidationFailed

# Pillow's own format names, by the signature their files start with.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
)
# Modes kept as they are or converted; 16-bit and float ones are refused, as
# Pillow would clip them to 8 bits without telling anyone.
_DEEP_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
SNAP = 8
MIN_SIZE = 64


class Use(StrEnum):
    """What an upload is for, which decides how it is converted."""

    IMAGE = "image"  # RGB
    MASK = "mask"  # L, white = repaint
    ALPHA_MASK = "alpha_mask"  # OpenAI's: transparent = repaint


@dataclass(frozen=True)
class CleanImage:
    """An accepted upload: PNG bytes without metadata, and their SHA-256."""

    data: bytes
    sha256: str
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or WEBP from the file's first bytes; None for anything else."""
    for signature, name in _SIGNATURES:
        if data.startswith(signature):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _refuse(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(message, details=[{"field": field, "message": message}])


def _alpha_mask(image: Image.Image, field: str) -> Image.Image:
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise _refuse(
            field,
            "The mask needs an alpha channel: its fully transparent pixels mark "
            "the area to repaint.",
        )
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda value: 255 if value == 0 else 0)


def has_transparency(image: CleanImage) -> bool:
    """Whether a cleaned image (kept as RGBA when it had alpha) has a clear pixel."""
    with Image.open(io.BytesIO(image.data), formats=["PNG"]) as opened:
        if "A" not in opened.getbands():
            return False
        low, _ = opened.getchannel("A").getextrema()
        return bool(low == 0)


def inspect_image(data: bytes, *, field: str, max_bytes: int, max_pixels: int) -> str:
    """Check an upload from its header alone (413 / 422): cheap, whatever the
    size it declares, so an image too large for the tier never gets decoded.
    Returns Pillow's name of its format."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"{field} is {len(data)} bytes; your tier accepts at most {max_bytes}.",
            details=[{"field": field, "message": f"At most {max_bytes} bytes."}],
        )
    kind = sniff_format(data)
    if kind is None:
        raise _refuse(field, "Not a PNG, JPEG or WebP image.")
    try:
        # Pillow itself refuses headers past twice its MAX_IMAGE_PIXELS (and
        # warns past it); the tier's own limit, far lower, is checked here.
        with Image.open(io.BytesIO(data), formats=[kind]) as opened:
            # Opening reads the header only: no pixel is decoded here.
            _check_header(opened, field, max_pixels)
    # The warning is an exception where warnings are errors (as in the tests).
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _refuse(field, "The image is too large to decode.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _refuse(field, f"The image cannot be decoded ({exc}).") from None
    return kind


def _check_header(opened: Image.Image, field: str, max_pixels: int) -> None:
    width, height = opened.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise _refuse(
            field,
            f"The image is {width}x{height} pixels; your tier accepts "
            f"at most {max_pixels} pixels.",
        )
    if getattr(opened, "n_frames", 1) > 1:
        raise _refuse(field, "Animated images are not accepted; send one frame.")
    if opened.mode in _DEEP_MODES:
        raise _refuse(
            field,
            f"{opened.mode} images (16-bit or float) are not accepted; "
            "send 8 bits per channel.",
        )


def clean_image(
    data: bytes,
    *,
    field: str,
    use: Use,
    max_bytes: int,
    max_pixels: int,
    keep_alpha: bool = False,
) -> CleanImage:
    """Check an upload and return it as a metadata-free PNG (413 / 422 otherwise)."""
    kind = inspect_image(data, field=field, max_bytes=max_bytes, max_pixels=max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=[kind]) as opened:
            # Checked again on this copy of the header, before a single pixel
            # is decoded.
            _check_header(opened, field, max_pixels)
            opened.load()
            # Photos say which way is up in EXIF, which is dropped below.
            upright = ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _refuse(field, "The image is too large to decode.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _refuse(field, f"The image cannot be decoded ({exc}).") from None
    if use is Use.ALPHA_MASK:
        converted = _alpha_mask(upright, field)
    elif use is Use.MASK:
        converted = upright.convert("L")
    elif keep_alpha and ("A" in upright.getbands() or "transparency" in upright.info):
        converted = upright.convert("RGBA")
    else:
        # CMYK, palette, grey and alpha inputs all become plain RGB.
        converted = upright.convert("RGB")
    # A new image of the pixels alone: no EXIF, ICC profile, text or XMP.
    fresh = Image.frombytes(converted.mode, converted.size, converted.tobytes())
    return as_png(fresh)


def as_png(image: Image.Image) -> CleanImage:
    """`image` encoded as a PNG with its hash and size (run in a thread)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    png = buffer.getvalue()
    return CleanImage(
        data=png,
        sha256=hashlib.sha256(png).hexdigest(),
        width=image.width,
        height=image.height,
    )


def flatten(image: CleanImage) -> CleanImage:
    """The same image without its alpha channel (RGB)."""
    with Image.open(io.BytesIO(image.data), formats=["PNG"]) as opened:
        rgb = opened.convert("RGB")
    return as_png(rgb)


def fit_size(width: int, height: int, cap: int) -> tuple[int, int]:
    """An input's size scaled down (aspect kept) to fit `cap`, in multiples of 8."""
    scale = min(1.0, cap / max(width, height))

    def snap(side: int) -> int:
        value = int(side * scale) // SNAP * SNAP
        return max(MIN_SIZE, min(cap // SNAP * SNAP, value))

    return snap(width), snap(height)

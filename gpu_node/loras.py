"""LoRA files in the node's folder: found, described and hashed without torch.

A `.safetensors` file starts with its JSON header (tensor names, shapes,
metadata), so a scan reads only that and the base a LoRA was trained for is
told from its cross-attention width. Kohya/A1111 (`lora_unet_...lora_down`)
and diffusers/PEFT (`unet....lora_A`) files are both recognised; loading them
is the engine's (diffusers converts either).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sdapi.contract.nodes import LoraOffer

log = logging.getLogger(__name__)

# Cross-attention (text embedding) width -> the base a LoRA or model is for.
# 32 is the built-in tiny model's (gpu_node.tiny).
BASE_KINDS: Mapping[int, str] = {32: "tiny", 768: "sd1", 1024: "sd2", 2048: "sdxl"}
# Text encoder widths, for LoRAs that train only the text encoder.
TEXT_KINDS: Mapping[int, str] = {32: "tiny", 768: "sd1", 1024: "sd2"}
HEADER_MAX = 100 * 1024 * 1024
TRIGGER_WORDS_MAX = 20
HASH_CHUNK = 1024 * 1024


class LoraFileError(ValueError):
    """A file in the LoRA folder is not a LoRA this node can read."""


def base_kind(width: int) -> str:
    """The base kind of a cross-attention width (`dim<N>` when not a known one)."""
    return BASE_KINDS.get(width, f"dim{width}")


def read_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str], int]:
    """Tensor shapes, metadata and the header's length of a safetensors file."""
    with path.open("rb") as file:
        raw = file.read(8)
        if len(raw) != 8:
            raise LoraFileError(f"{path.name}: not a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > HEADER_MAX:
            raise LoraFileError(f"{path.name}: header too large")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LoraFileError(f"{path.name}: not a safetensors file") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{path.name}: not a safetensors file")
    metadata = header.pop("__metadata__", None) or {}
    shapes = {
        name: list(entry.get("shape", []))
        for name, entry in header.items()
        if isinstance(entry, dict)
    }
    return shapes, {str(k): str(v) for k, v in metadata.items()}, 8 + length


def _is_down(name: str) -> bool:
    return any(
        marker in name
        for marker in ("lora_down.weight", "lora_A.weight", "lora.down.weight")
    )


def detect_kind(shapes: Mapping[str, list[int]]) -> str:
    """The base a LoRA is for, from its tensors' names and shapes."""
    if not any(_is_down(name) for name in shapes):
        raise LoraFileError("no LoRA tensors (lora_down / lora_A) in it")
    if any(name.startswith(("lora_te2_", "text_encoder_2.")) for name in shapes):
        return "sdxl"
    for name, shape in shapes.items():
        # The key projection of cross-attention reads the text embeddings.
        if "attn2" in name and "to_k" in name and _is_down(name) and len(shape) == 2:
            return base_kind(int(shape[1]))
    for name, shape in shapes.items():
        text = name.startswith(("lora_te_", "lora_te1_", "text_encoder."))
        if text and _is_down(name) and len(shape) == 2:
            width = int(shape[1])
            return TEXT_KINDS.get(width, f"dim{width}")
    raise LoraFileError("cannot tell its base model (no cross-attention tensors)")


def trigger_words(metadata: Mapping[str, str]) -> list[str]:
    """The most frequent training tags (kohya's `ss_tag_frequency`), if any."""
    try:
        frequency = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return []
    counts: dict[str, int] = {}
    if isinstance(frequency, dict):
        for tags in frequency.values():
            if not isinstance(tags, dict):
                continue
            for tag, count in tags.items():
                word = str(tag).strip()
                if word and isinstance(count, int | float):
                    counts[word] = counts.get(word, 0) + int(count)
    ranked = sorted(counts, key=lambda tag: (-counts[tag], tag))
    return ranked[:TRIGGER_WORDS_MAX]


def tensor_hash(path: Path, offset: int) -> str:
    """SHA-256 of the tensor data (A1111's `addnet` hash: metadata edits
    do not change it)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        file.seek(offset)
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class LoraFile:
    """One LoRA the node can apply."""

    name: str
    path: Path
    kind: str
    trigger_words: tuple[str, ...]
    sha256: str
    stamp: tuple[int, int]

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    def offer(self) -> LoraOffer:
        return LoraOffer(
            name=self.name,
            kind=self.kind,
            trigger_words=list(self.trigger_words),
            sha256=self.sha256,
        )


def describe(path: Path, stamp: tuple[int, int]) -> LoraFile:
    """Read a LoRA file's header and hash its tensors (blocking)."""
    shapes, metadata, offset = read_header(path)
    try:
        kind = detect_kind(shapes)
    except LoraFileError as exc:
        raise LoraFileError(f"{path.name}: {exc}") from None
    return LoraFile(
        name=path.stem,
        path=path,
        kind=kind,
        trigger_words=tuple(trigger_words(metadata)),
        sha256=tensor_hash(path, offset),
        stamp=stamp,
    )


class LoraFolder:
    """The LoRAs in one folder, as of the last `scan` (call it in a thread)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: dict[str, LoraFile] = {}
        # Files that failed, by stamp: logged once, not re-read every scan.
        self._bad: dict[Path, tuple[int, int]] = {}

    @property
    def files(self) -> dict[str, LoraFile]:
        return dict(self._files)

    def get(self, name: str) -> LoraFile | None:
        return self._files.get(name)

    def scan(self) -> bool:
        """Re-read the folder; only new or changed files are opened. True when
        the set of LoRAs changed."""
        found: dict[str, LoraFile] = {}
        try:
            paths = sorted(self.folder.glob("*.safetensors"))
        except OSError:
            paths = []
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            known = self._files.get(path.stem)
            if known is not None and known.stamp == stamp:
                found[path.stem] = known
                continue
            if self._bad.get(path) == stamp:
                continue
            try:
                found[path.stem] = describe(path, stamp)
            except (OSError, LoraFileError) as exc:
                log.warning("skipping LoRA %s: %s", path, exc)
                self._bad[path] = stamp
        changed = found != self._files
        self._files = found
        return changed

    def offers(self) -> list[LoraOffer]:
        return [found.offer() for found in self._files.values()]

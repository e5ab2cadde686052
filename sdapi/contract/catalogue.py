"""SDAPI_MODELS: the models a GPU node may serve, and the names web knows them by.

One variable configures both: `spec` or `name=spec` entries, comma-separated,
where `spec` is `tiny`, a diffusers folder, a single-file `.safetensors`
checkpoint or a Hugging Face repo id.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import NamedTuple

SINGLE_FILE_SUFFIX = ".safetensors"


class CatalogueEntry(NamedTuple):
    """One entry of SDAPI_MODELS: the name it is served under, if given, and
    where its weights are."""

    name: str | None
    spec: str


def parse_catalogue(text: str) -> list[CatalogueEntry]:
    """`a,b=c` -> [(None, "a"), ("b", "c")]; blank entries are skipped."""
    entries: list[CatalogueEntry] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, spec = item.partition("=")
        if not sep:
            entries.append(CatalogueEntry(None, item))
            continue
        name, spec = name.strip(), spec.strip()
        if not name or not spec:
            raise ValueError(f"{item!r}: expected `spec` or `name=spec`")
        entries.append(CatalogueEntry(name, spec))
    return entries


def served_name(entry: CatalogueEntry) -> str:
    """The name a model is served under, as far as the text alone tells.

    A path is named by its last part (a single file by its stem); `tiny` and
    repo ids by themselves. A node that finds a relative folder on disk names
    it by the folder too: give such entries a `name=` to be sure web agrees.
    """
    if entry.name:
        return entry.name
    spec = entry.spec
    if spec.endswith(SINGLE_FILE_SUFFIX) or spec.startswith(("/", ".", "~")):
        path = PurePosixPath(spec.rstrip("/"))
        return path.stem if spec.endswith(SINGLE_FILE_SUFFIX) else path.name
    return spec

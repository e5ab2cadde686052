"""Model weights on a node: local folders, single files, hub downloads, tiny.

Torch-free: it finds, fetches and checks model folders and single-file
checkpoints; `gpu_node.pipeline` builds the tiny model and loads them. Only
safetensors weights are used.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gpu_node import checkpoints
from gpu_node.calls import ModelError

log = logging.getLogger(__name__)

TINY_MODEL = "tiny"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
HASH_CACHE = ".sdapi-weights.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Pipeline components never loaded. SD 1.5's safety checker blacks out the
# images it flags while the generation still reports success, so it is
# neither downloaded nor loaded: content policy is the operator's, applied
# upstream of the node (a moderation step of its own would go in `jobs`,
# where results are stored, and say so in the result).
SKIPPED_COMPONENTS = frozenset({"safety_checker"})
# A diffusers repo's config, tokenizer and safetensors weights; never pickles,
# never the half-precision duplicates or single-file checkpoints at the root.
HUB_ALLOW_PATTERNS = ("model_index.json", "*/*.json", "*/*.txt", "*/*.safetensors")
HUB_IGNORE_PATTERNS = (
    "*.fp16.safetensors",
    "*.non_ema.safetensors",
    "*.ema.safetensors",
    *(f"{component}/*" for component in sorted(SKIPPED_COMPONENTS)),
)


@dataclass(frozen=True)
class ModelLocation:
    """Where a model's folder or single file is (or will be), and its name."""

    model_id: str
    path: Path
    source: Literal["tiny", "local", "hub", "file"]
    repo_id: str = ""


def locate_model(spec: str, models_dir: Path, name: str | None = None) -> ModelLocation:
    """Resolve SDAPI_MODEL to a folder or file; nothing is created or fetched yet.

    A single file is named by its stem (`dreamshaper_8.safetensors` serves as
    `dreamshaper_8`) unless `name` is given.
    """
    if spec == TINY_MODEL:
        return ModelLocation(name or TINY_MODEL, models_dir / TINY_MODEL, "tiny")
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelLocation(name or path.resolve().name, path.resolve(), "local")
    if path.is_file():
        checkpoints.check_suffix(path)
        return ModelLocation(name or path.stem, path.resolve(), "file")
    if not _REPO_ID.match(spec):
        if spec.startswith((".", "/", "~")) or os.sep in spec:
            raise ModelError(f"model {path} does not exist (SDAPI_MODEL={spec})")
        raise ModelError(
            f"SDAPI_MODEL={spec!r} is neither `tiny`, an existing folder or "
            ".safetensors file nor a Hugging Face repo id (owner/name)"
        )
    return ModelLocation(
        name or spec, models_dir / spec.replace("/", "--"), "hub", spec
    )


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a whole diffusers model (it is renamed in at the end)."""
    return (folder / "model_index.json").is_file()


def install_folder(target: Path, build: Callable[[Path], None]) -> bool:
    """Build a folder beside `target` and rename it in; False if another won.

    Two processes may start at once: each builds in its own temporary folder
    and the atomic rename decides; the loser removes its copy.
    """
    if is_complete(target):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = (
        target.parent / f".{target.name}.building-{os.getpid()}-{secrets.token_hex(4)}"
    )
    try:
        build(scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            if not is_complete(target):
                raise
            return False
        return True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_weights(folder: Path) -> None:
    """Refuse a folder whose weights exist only as pickles (never loaded)."""
    if not is_complete(folder):
        pickles = sorted(
            p.name for p in folder.glob("**/*") if p.suffix in PICKLE_SUFFIXES
        )
        if pickles:
            raise ModelError(
                f"model folder {folder} holds pickle weights only ({pickles[0]}); "
                "sdapi loads safetensors only: convert it to safetensors first"
            )
        raise ModelError(
            f"{folder} is not a diffusers model folder (no model_index.json)"
        )
    index = json.loads((folder / "model_index.json").read_text())
    for component, spec in index.items():
        if (
            component.startswith("_")
            or component in SKIPPED_COMPONENTS
            or not isinstance(spec, list)
        ):
            continue
        sub = folder / component
        if not sub.is_dir():
            continue
        files = [p for p in sub.iterdir() if p.is_file()]
        pickles = [p.name for p in files if p.suffix in PICKLE_SUFFIXES]
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            raise ModelError(
                f"model folder {folder} holds pickle weights only for {component} "
                f"({pickles[0]}); sdapi loads safetensors only: convert it first"
            )


def weights_hash(folder: Path) -> str:
    """SHA-256 over the folder's safetensors files (names and bytes), cached.

    For a single file, the SHA-256 of the file (A1111's full hash), cached in
    a hidden file beside it.
    """
    if folder.is_file():
        files = [folder]
        stamp = [[folder.name, folder.stat().st_size, folder.stat().st_mtime_ns]]
        cache = folder.with_name(f".{folder.name}{HASH_CACHE}")
    else:
        files = sorted(folder.glob("**/*.safetensors"))
        stamp = [
            [str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files
        ]
        cache = folder / HASH_CACHE
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(cache.read_text())
        if cached["files"] == stamp:
            return str(cached["sha256"])
    total = hashlib.sha256()
    for path in files:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if path == folder:
            total = digest
            break
        total.update(f"{path.relative_to(folder)}\0{digest.hexdigest()}\n".encode())
    value = total.hexdigest()
    # A read-only model folder is fine: the hash is then recomputed each start.
    with contextlib.suppress(OSError):
        scratch = cache.with_name(f"{HASH_CACHE}.{os.getpid()}")
        scratch.write_text(json.dumps({"files": stamp, "sha256": value}))
        os.replace(scratch, cache)
    return value


def _hub_files(repo_id: str) -> list[tuple[str, int]]:
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, files_metadata=True)
    names = {s.rfilename: s.size or 0 for s in info.siblings or []}
    return [(name, names[name]) for name in sorted(names) if hub_file_wanted(name)]


def hub_file_wanted(name: str) -> bool:
    """Whether a file of a hub repo is downloaded (by its path in the repo)."""
    return any(fnmatch.fnmatch(name, p) for p in HUB_ALLOW_PATTERNS) and not any(
        fnmatch.fnmatch(name, p) for p in HUB_IGNORE_PATTERNS
    )


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def download_model(location: ModelLocation) -> None:
    """Fetch a hub model into its folder once (safetensors, configs, tokenizer)."""
    if is_complete(location.path):
        return
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils.tqdm import disable_progress_bars

    where = f"model {location.repo_id} is not in {location.path}"
    if constants.HF_HUB_OFFLINE:
        raise ModelError(f"{where} and HF_HUB_OFFLINE=1 forbids downloading it")
    try:
        files = _hub_files(location.repo_id)
    except Exception as exc:
        raise ModelError(
            f"{where} and cannot be downloaded ({_describe(exc)})"
        ) from None
    if "model_index.json" not in {name for name, _ in files}:
        raise ModelError(
            f"{location.repo_id} is not a diffusers model with safetensors weights "
            "(no model_index.json)"
        )
    total = sum(size for _, size in files)
    log.info(
        "downloading %s: %d files, %.1f MB into %s",
        location.repo_id,
        len(files),
        total / 1e6,
        location.path,
    )

    def fetch(scratch: Path) -> None:
        done = 0
        for index, (name, size) in enumerate(files, 1):
            hf_hub_download(location.repo_id, name, local_dir=scratch)
            done += size
            log.info(
                "downloaded %s %d/%d %s (%.0f%% of %.1f MB)",
                location.repo_id,
                index,
                len(files),
                name,
                100 * done / max(total, 1),
                total / 1e6,
            )
        shutil.rmtree(scratch / ".cache", ignore_errors=True)

    try:
        # One log line per file instead of interleaved progress bars.
        with disable_progress_bars():
            install_folder(location.path, fetch)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"{where} and the download failed ({_describe(exc)})"
        ) from None


def prepare_model(location: ModelLocation, build_tiny: Callable[[Path], None]) -> None:
    """Make the model's folder exist and hold loadable weights (blocking).

    The tiny model is made by `build_tiny` (it needs torch, so the caller
    imports it only then); a hub model is downloaded once; every folder is
    then checked for pickle-only weights.
    """
    if location.source == "tiny":
        if install_folder(location.path, build_tiny):
            log.info("built the tiny model in %s", location.path)
    elif location.source == "hub":
        download_model(location)
    elif location.source == "file":
        # Read the header now: a wrong file fails before torch is loaded.
        arch = checkpoints.architecture(location.path)
        log.info("%s is a %s checkpoint (%s)", location.path, arch.kind, arch.source)
        return
    check_weights(location.path)

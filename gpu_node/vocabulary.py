"""CLIP's tokenizer vocabulary, written from the merges file this package ships.

Torch-free: the tiny model and single-file checkpoints both build their
tokenizer folders from it, so no tokenizer is ever downloaded.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The real CLIP vocabulary: 256 bytes, 256 end-of-word bytes, 48,894 merges and
# the two special tokens.
CLIP_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE: every byte gets a printable stand-in character.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def clip_vocabulary_file() -> Traversable:
    """The CLIP BPE merges file this package ships (OpenAI CLIP, MIT licence)."""
    return resources.files("gpu_node") / "data" / CLIP_VOCAB_FILE


def write_clip_vocabulary(folder: Path) -> int:
    """Write vocab.json and merges.txt of CLIP's tokenizer; return the vocab size."""
    base = list(_bytes_to_unicode().values())
    # The first line of the file is a version header, not a merge.
    lines = gzip.decompress(clip_vocabulary_file().read_bytes()).decode("utf-8")
    merges = lines.split("\n")[1 : CLIP_MERGES + 1]
    vocab = [*base, *(token + "</w>" for token in base)]
    vocab += ["".join(merge.split()) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps(
            {token: index for index, token in enumerate(vocab)}, ensure_ascii=False
        )
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)

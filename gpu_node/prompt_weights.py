"""AUTOMATIC1111's prompt emphasis syntax, parsed into weighted text chunks.

`(word)` multiplies the weight of `word` by 1.1, `[word]` divides it by 1.1,
`(word:1.3)` multiplies it by 1.3; brackets nest, and brackets left open at
the end close there. `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal
characters. `BREAK` (a word in capitals) ends the current 75-token window of
the text encoder. The rules and their corner cases are those of A1111's
`modules/prompt_parser.py`, so prompts written for it mean the same here.

Pure Python (no torch): the engine turns the chunks into weighted embeddings.
"""

from __future__ import annotations

import re
from typing import Final, TypeAlias

# A chunk of prompt text and the weight of its tokens.
Chunk: TypeAlias = tuple[str, float]

# A1111 marks a BREAK with this chunk (text "BREAK", weight -1).
BREAK: Final[Chunk] = ("BREAK", -1.0)
ROUND_MULTIPLIER: Final = 1.1
SQUARE_MULTIPLIER: Final = 1 / 1.1

_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes, and a lone backslash
    \(|\[|
    :\s*([+-]?[.\d]+)\s*\)|       # the end of (text:weight)
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def is_break(chunk: Chunk) -> bool:
    """Whether `chunk` is a BREAK, which starts a new encoder window."""
    return chunk == BREAK


def parse_prompt(text: str) -> list[Chunk]:
    """`text` as [(text, weight)] chunks, neighbours of equal weight merged.

    >>> parse_prompt("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    chunks: list[list[str | float]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, multiplier: float) -> None:
        for chunk in chunks[start:]:
            chunk[1] = float(chunk[1]) * multiplier

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), _number(match.group(1))
        if piece.startswith("\\"):
            chunks.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(chunks))
        elif piece == "[":
            square_open.append(len(chunks))
        elif weight is not None and round_open:
            multiply(round_open.pop(), weight)
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK.split(piece)):
                if index > 0:
                    chunks.append(list(BREAK))
                chunks.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)

    # A BREAK inside brackets got a weight; it still ends the window.
    result: list[Chunk] = [
        BREAK if chunk[0] == BREAK[0] and float(chunk[1]) < 0 else _chunk(chunk)
        for chunk in chunks
    ]
    if not result:
        return [("", 1.0)]
    merged = [result[0]]
    for chunk in result[1:]:
        last = merged[-1]
        if chunk[1] == last[1] and not is_break(chunk) and not is_break(last):
            merged[-1] = (last[0] + chunk[0], last[1])
        else:
            merged.append(chunk)
    return merged


def plain(text: str) -> list[Chunk]:
    """`text` taken literally: one chunk of weight 1."""
    return [(text, 1.0)]


def chunks_of(text: str, syntax: str) -> list[Chunk]:
    """`text` read with `syntax` ("a1111" or "plain")."""
    return plain(text) if syntax == "plain" else parse_prompt(text)


def _number(text: str | None) -> float | None:
    # The pattern also matches "..", which A1111 fails on: here it is text.
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _chunk(chunk: list[str | float]) -> Chunk:
    return (str(chunk[0]), float(chunk[1]))

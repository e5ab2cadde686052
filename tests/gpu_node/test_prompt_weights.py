"""A1111's emphasis syntax: its own documented examples, BREAK and escapes."""

from __future__ import annotations

import pytest

from gpu_node.prompt_weights import BREAK, chunks_of, parse_prompt

# The examples of the parse_prompt_attention docstring in A1111's
# modules/prompt_parser.py, with the results it documents.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), A1111_EXAMPLES)
def test_a1111_documented_examples(
    text: str, expected: list[tuple[str, float]]
) -> None:
    assert parse_prompt(text) == expected


def test_prompt_weights_explicit_and_square() -> None:
    assert parse_prompt("(cat:1.5) on a [mat]") == [
        ("cat", 1.5),
        (" on a ", 1.0),
        ("mat", 1 / 1.1),
    ]
    assert parse_prompt("(cat: 0.5 )") == [("cat", 0.5)]
    assert parse_prompt("[[dog]]") == [("dog", (1 / 1.1) * (1 / 1.1))]


def test_prompt_weights_literals_and_stray_brackets() -> None:
    assert parse_prompt("a \\(b\\) \\\\ c") == [("a (b) \\ c", 1.0)]
    # Closing brackets without an opening one, and colons, are plain text.
    assert parse_prompt("a) b] c:1.2) d:e") == [("a) b] c:1.2) d:e", 1.0)]
    assert parse_prompt("(x:..)") == [("x:..)", 1.1)]
    assert parse_prompt("") == [("", 1.0)]


def test_prompt_weights_break_splits_windows() -> None:
    assert parse_prompt("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]
    # Only the word in capitals, not inside other words.
    assert parse_prompt("breakfast BREAKS") == [("breakfast BREAKS", 1.0)]
    # Inside brackets it still ends the window (A1111 would weight the word).
    assert parse_prompt("(a BREAK b)") == [("a", 1.1), BREAK, ("b", 1.1)]


def test_prompt_syntax_plain_is_literal() -> None:
    assert chunks_of("(cat:1.5) BREAK", "plain") == [("(cat:1.5) BREAK", 1.0)]
    assert chunks_of("(cat:1.5)", "a1111") == [("cat", 1.5)]

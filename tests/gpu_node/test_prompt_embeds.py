"""A1111 prompt weights and long prompts on the tiny model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image

from gpu_node import pipeline
from gpu_node.calls import CallItem, Engine, PipelineCall, QuietObserver
from gpu_node.prompt_weights import parse_prompt


def _image(
    engine: Engine, prompt: str, syntax: str = "a1111", negative: str = "blurry"
) -> np.ndarray[Any, Any]:
    call = PipelineCall(
        64,
        64,
        3,
        7.5,
        "euler",
        (CallItem("g", prompt, negative, (11,)),),
        prompt_syntax=syntax,
    )
    image: Image.Image = engine.run(call, QuietObserver())["g"][0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _words(count: int, word: str) -> str:
    return " ".join([word] * count)


def test_prompt_weight_one_is_the_plain_prompt(tiny_engine: Engine) -> None:
    assert np.array_equal(_image(tiny_engine, "(cat:1.0)"), _image(tiny_engine, "cat"))


def test_prompt_weight_changes_the_image(tiny_engine: Engine) -> None:
    plain = _image(tiny_engine, "a cat on a mat")
    assert np.abs(_image(tiny_engine, "a (cat:1.5) on a mat") - plain).max() > 0
    assert np.abs(_image(tiny_engine, "a [cat] on a mat") - plain).max() > 0


def test_long_prompt_tail_changes_the_image(tiny_engine: Engine) -> None:
    # 200 tokens (three windows), the same first 150.
    head = _words(150, "cat")
    tokens = tiny_engine.prompt_windows(head + " " + _words(50, "dog"), "a1111")
    assert tokens == 3
    first = _image(tiny_engine, head + " " + _words(50, "dog"))
    second = _image(tiny_engine, head + " " + _words(50, "ship"))
    assert np.abs(first - second).max() > 0


def test_prompt_syntax_plain_reads_brackets_literally(tiny_engine: Engine) -> None:
    weighted = _image(tiny_engine, "(cat:1.5)")
    literal = _image(tiny_engine, "(cat:1.5)", syntax="plain")
    assert np.abs(weighted - literal).max() > 0
    assert tiny_engine.prompt_windows("a BREAK b", "a1111") == 2
    assert tiny_engine.prompt_windows("a BREAK b", "plain") == 1


def test_negative_prompt_longer_than_the_prompt_is_padded(
    tiny_engine: Engine,
) -> None:
    image = _image(tiny_engine, "a cat", negative=_words(100, "blurry"))
    assert image.shape == (64, 64, 3)


def test_token_windows_follow_a1111(tiny_engine: Engine) -> None:
    tokenizer = tiny_engine._base.tokenizer  # type: ignore[attr-defined]
    eos = tokenizer.eos_token_id
    (single,) = pipeline.token_windows(tokenizer, parse_prompt("a (cat:1.5)"), 75)
    ids, weights = single
    assert len(ids) == len(weights) == 77
    assert ids[0] == tokenizer.bos_token_id and ids[3:] == [eos] * 74
    assert weights[:4] == [1.0, 1.0, 1.5, 1.0]
    # A window that fills up close after a comma ends at the comma.
    text = _words(70, "cat") + ", " + _words(10, "dog")
    first, second = pipeline.token_windows(tokenizer, parse_prompt(text), 75)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    assert first[0][71] == comma and first[0][72:] == [eos] * 5
    assert (
        second[0][1:11] == tokenizer("dog " * 10, add_special_tokens=False)["input_ids"]
    )


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_emphasis_keeps_the_mean(weight: float) -> None:
    import torch

    hidden = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(1))
    weights = torch.ones(2, 77)
    weights[:, 5] = weight
    out = pipeline.emphasize(hidden, weights)
    assert torch.allclose(out.mean(dim=(1, 2)), hidden.mean(dim=(1, 2)), atol=1e-6)
    assert not torch.equal(out, hidden)

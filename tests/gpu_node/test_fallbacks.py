"""What a node does with only the package installed, and where something is
missing: the tiny model's tokenizer, schedulers without scipy, no CUDA."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import CLIPTokenizer

from gpu_node import pipeline, tiny
from gpu_node.calls import ModelError


def test_the_vocabulary_ships_inside_the_package_with_its_licence() -> None:
    source = tiny.clip_vocabulary_file()
    assert source.is_file()
    package = Path(pipeline.__file__).parent
    assert Path(str(source)).is_relative_to(package)
    licence = (package / "data" / "CLIP-LICENSE.txt").read_text()
    assert "Copyright (c) 2021 OpenAI" in licence
    assert "MIT License" in licence


def test_the_written_vocabulary_is_clips_and_tokenizes_like_it(
    tmp_path: Path,
) -> None:
    size = tiny.write_clip_vocabulary(tmp_path)
    assert size == 49408
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert len(vocab) == size
    merges = (tmp_path / "merges.txt").read_text().splitlines()
    # A header, then one "left right" pair per line: an empty or ragged line is
    # what made transformers refuse the old fallback file.
    assert merges[0] == "#version: 0.2"
    assert len(merges) == 1 + tiny.CLIP_MERGES
    assert all(len(line.split()) == 2 for line in merges[1:])
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path), model_max_length=77)
    # OpenAI CLIP's own ids for these words, and its start/end tokens.
    ids = tokenizer("a photo of a cat")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_lms_is_offered_only_where_scipy_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "lms" in pipeline.available_schedulers()
    real = importlib.util.find_spec

    def without_scipy(name: str, *args: Any) -> Any:
        return None if name == "scipy" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_scipy)
    offered = pipeline.available_schedulers()
    assert "lms" not in offered
    assert "euler" in offered


def test_auto_falls_back_to_the_cpu_without_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pipeline._pick_device("auto") == torch.device("cpu")
    assert pipeline._pick_device("cpu") == torch.device("cpu")
    # Asked for CUDA by name, a node without it stops with a clear error
    # rather than running a GPU's work on its CPU.
    with pytest.raises(ModelError, match="no CUDA device"):
        pipeline._pick_device("cuda")

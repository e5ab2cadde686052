"""Model weights on a node: folders, pickle refusal, offline hub models, tiny."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_node import weights
from gpu_node.calls import CallItem, ModelError, PipelineCall, QuietObserver

REPO = Path(__file__).resolve().parents[2]


def test_tiny_model_has_safetensors_and_the_real_clip_vocabulary(
    models_dir: Path,
) -> None:
    folder = models_dir / "tiny"
    assert weights.is_complete(folder)
    files = sorted(
        p.relative_to(folder).as_posix() for p in folder.glob("**/*.safetensors")
    )
    assert files == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert not [p for p in folder.glob("**/*") if p.suffix in weights.PICKLE_SUFFIXES]
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    # No half-built folder is ever left beside the model.
    assert [p.name for p in models_dir.iterdir()] == ["tiny"]


def test_tiny_tokenizer_is_clip(models_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(models_dir / "tiny" / "tokenizer"))
    # The ids openai/clip-vit-large-patch14 gives this text.
    assert tokenizer("a photo of a cat").input_ids == [
        49406,
        320,
        1125,
        539,
        320,
        2368,
        49407,
    ]
    assert tokenizer.model_max_length == 77


def test_pickle_only_folder_is_refused(tmp_path: Path, models_dir: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(models_dir / "tiny", folder)
    for path in folder.glob("**/*.safetensors"):
        path.with_suffix(".bin").write_bytes(b"not loaded")
        path.unlink()
    with pytest.raises(ModelError, match="pickle weights only"):
        weights.check_weights(folder)

    single = tmp_path / "single-file"
    single.mkdir()
    (single / "v1-5-pruned.ckpt").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match=r"pickle weights only \(v1-5-pruned.ckpt\)"):
        weights.check_weights(single)


def test_local_model_folder_is_served_under_its_name(
    tmp_path: Path, models_dir: Path
) -> None:
    from gpu_node import pipeline, tiny

    folder = tmp_path / "my-model"
    shutil.copytree(models_dir / "tiny", folder)
    location = weights.locate_model(str(folder), tmp_path / "unused")
    assert (location.model_id, location.source, location.path) == (
        "my-model",
        "local",
        folder,
    )
    tiny.prepare_model(location)
    engine = pipeline.load_engine(location, device="cpu")
    assert engine.profile.model == "my-model"
    call = PipelineCall(64, 64, 2, 7.5, "ddim", (CallItem("x", "a boat", "", (1,)),))

    images = engine.run(call, QuietObserver())
    assert images["x"][0].size == (64, 64)


def test_locate_model_names() -> None:
    models = Path("/nowhere/models")
    assert weights.locate_model("tiny", models).path == models / "tiny"
    hub = weights.locate_model("stabilityai/sdxl-turbo", models)
    assert (hub.source, hub.model_id, hub.path) == (
        "hub",
        "stabilityai/sdxl-turbo",
        models / "stabilityai--sdxl-turbo",
    )
    with pytest.raises(ModelError, match="does not exist"):
        weights.locate_model("/nowhere/at/all", models)
    with pytest.raises(ModelError, match="neither"):
        weights.locate_model("not a model", models)


@pytest.mark.slow
def test_missing_model_offline_fails_with_one_line(
    tmp_path: Path, clean_redis: str
) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SDAPI_MODEL": "someone/missing-model",
        "SDAPI_MODEL_DIR": str(tmp_path / "models"),
        "SDAPI_REDIS_URL": clean_redis,
    }
    done = subprocess.run(
        [sys.executable, "-m", "sdapi", "gpu-node"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("sdapi: model someone/missing-model is not in ")
    assert str(tmp_path / "models" / "someone--missing-model") in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0]


@pytest.mark.slow
def test_node_modules_import_without_torch() -> None:
    code = (
        "import sys\n"
        "import sdapi.contract, gpu_node.settings, gpu_node.calls, gpu_node.weights\n"
        "import gpu_node.executor, gpu_node.progress, gpu_node.images\n"
        "import gpu_node.announcer, gpu_node.health, gpu_node.node, gpu_node.main\n"
        "heavy = ('torch', 'diffusers', 'transformers')\n"
        "loaded = sorted(m for m in heavy if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == ""

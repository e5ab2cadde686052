"""Loading a single-file checkpoint (LDM/SGM layout) with the configs we ship.

diffusers' `from_single_file` converts the weights; the configs it needs come
from this package, never from the network: the original LDM/SGM yaml
describes the UNet and the VAE (the file's own `<name>.yaml` when it has
one), and a folder of component configs (text encoders, tokenizers with the
CLIP vocabulary we ship, scheduler) is assembled for the load in a scratch
folder. The file is checked against its architecture first, so a file that
does not match fails naming its first missing or misshapen key.
"""

from __future__ import annotations

import json
import re
import tempfile
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from gpu_node import checkpoints
from gpu_node.calls import ModelError
from gpu_node.vocabulary import write_clip_vocabulary

# Width of one attention head in every released SD text encoder (CLIP ViT-L,
# OpenCLIP ViT-H and bigG); heads are not visible in the weights.
CLIP_HEAD_WIDTH = 64
# Narrower encoders (the tiny model's) use 8-wide heads.
SMALL_HEAD_WIDTH = 8
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")


def _copy_tree(source: Traversable, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir():
            _copy_tree(entry, target / entry.name)
        else:
            (target / entry.name).write_bytes(entry.read_bytes())


def _fit_text_encoder(
    config: dict[str, Any], prefix: str, shapes: checkpoints.Shapes
) -> dict[str, Any]:
    """A Hugging Face-layout CLIP config sized to the file's own encoder."""
    embeddings = f"{prefix}text_model.embeddings."
    tokens = shapes.get(f"{embeddings}token_embedding.weight")
    positions = shapes.get(f"{embeddings}position_embedding.weight")
    mlp = shapes.get(f"{prefix}text_model.encoder.layers.0.mlp.fc1.weight")
    layers = {
        int(found[1])
        for name in shapes
        if name.startswith(prefix) and (found := _LAYER.match(name[len(prefix) :]))
    }
    if not (tokens and positions and mlp and layers):
        return config  # the check that follows names what is missing
    hidden = tokens[1]
    fitted = dict(
        config,
        vocab_size=tokens[0],
        hidden_size=hidden,
        max_position_embeddings=positions[0],
        intermediate_size=mlp[0],
        num_hidden_layers=max(layers) + 1,
    )
    if hidden != config["hidden_size"]:
        width = CLIP_HEAD_WIDTH if hidden % CLIP_HEAD_WIDTH == 0 else SMALL_HEAD_WIDTH
        fitted["num_attention_heads"] = max(1, hidden // width)
        fitted["projection_dim"] = hidden
    return fitted


def _config_folder(
    folder: Path, arch: checkpoints.Architecture, shapes: checkpoints.Shapes
) -> None:
    """Write the diffusers component configs for loading `arch` into `folder`."""
    _copy_tree(checkpoints.shipped_configs() / arch.family, folder)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if (folder / tokenizer).is_dir():
            write_clip_vocabulary(folder / tokenizer)
    scheduler = folder / "scheduler" / "scheduler_config.json"
    settings = json.loads(scheduler.read_text())
    settings["prediction_type"] = arch.prediction
    scheduler.write_text(json.dumps(settings))
    for index, encoder in enumerate(("text_encoder", "text_encoder_2")):
        prefix = checkpoints.text_encoder_prefix(arch.family, index)
        path = folder / encoder / "config.json"
        if prefix is not None and path.is_file():
            fitted = _fit_text_encoder(json.loads(path.read_text()), prefix, shapes)
            path.write_text(json.dumps(fitted))


def _expected_shapes(
    arch: checkpoints.Architecture,
    original: dict[str, Any],
    shapes: checkpoints.Shapes,
    folder: Path,
) -> dict[str, tuple[int, ...]]:
    """LDM key -> shape for every tensor the architecture loads from the file."""
    # Empty tensors on the meta device: diffusers' config helpers look at a
    # few shapes, and the models are built without memory.
    fake = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    unet_config = create_unet_diffusers_config_from_ldm(original, fake)  # type: ignore[no-untyped-call]
    vae_config = create_vae_diffusers_config_from_ldm(original, fake)  # type: ignore[no-untyped-call]
    expected: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        unet: Any = UNet2DConditionModel.from_config(unet_config)  # type: ignore[no-untyped-call]
        vae: Any = AutoencoderKL.from_config(vae_config)  # type: ignore[no-untyped-call]
        up_with_attention = {
            index
            for index, kind in enumerate(unet_config["up_block_types"])
            if "CrossAttn" in kind
        }
        for key, value in unet.state_dict().items():
            name = checkpoints.unet_key(
                key, int(unet_config["layers_per_block"]), up_with_attention
            )
            expected[name] = tuple(value.shape)
        levels = len(vae_config["block_out_channels"])
        for key, value in vae.state_dict().items():
            name = checkpoints.vae_key(key, levels)
            shape = tuple(value.shape)
            if checkpoints.is_vae_attention_matrix(name):
                shape = (*shape, 1, 1)
            expected[name] = shape
        for index, encoder in enumerate(("text_encoder", "text_encoder_2")):
            prefix = checkpoints.text_encoder_prefix(arch.family, index)
            path = folder / encoder / "config.json"
            if prefix is None or not path.is_file():
                continue
            model = CLIPTextModel(CLIPTextConfig.from_json_file(str(path)))
            for key, value in model.state_dict().items():
                if key.endswith("position_ids"):
                    continue
                name = key if key.startswith("text_model.") else f"text_model.{key}"
                expected[prefix + name] = tuple(value.shape)
    return expected


def _check_shapes(
    path: Path,
    arch: checkpoints.Architecture,
    expected: dict[str, tuple[int, ...]],
    shapes: checkpoints.Shapes,
) -> None:
    """Fail naming the first key the file lacks or holds in another shape."""
    for name, shape in expected.items():
        found = shapes.get(name)
        if found is None:
            raise ModelError(
                f"{path} is not a whole {arch.kind} checkpoint: {name} is missing"
            )
        if found != shape:
            raise ModelError(
                f"{path} does not match {arch.kind}: {name} has shape "
                f"{list(found)}, the architecture needs {list(shape)}"
            )


def load(
    path: Path,
    arch: checkpoints.Architecture,
    pipeline_class: Any,
    *,
    dtype: torch.dtype,
    extra: dict[str, Any],
) -> tuple[Any, Any]:
    """The pipeline from `path` and a tokenizer for counting (blocking)."""
    shapes = checkpoints.read_shapes(path)
    original: dict[str, Any] = yaml.safe_load(arch.original_config.read_text())
    with tempfile.TemporaryDirectory(prefix="sdapi-single-file-") as scratch:
        folder = Path(scratch) / "configs"
        _config_folder(folder, arch, shapes)
        _check_shapes(
            path, arch, _expected_shapes(arch, original, shapes, folder), shapes
        )
        original_config = Path(scratch) / "original.yaml"
        # diffusers takes the original config as a file path.
        original_config.write_text(arch.original_config.read_text())
        try:
            base: Any = pipeline_class.from_single_file(
                str(path),
                config=str(folder),
                original_config=str(original_config),
                local_files_only=True,
                dtype=dtype,
                **extra,
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            text = " ".join(str(exc).split())[:300]
            raise ModelError(f"cannot load {path} as {arch.kind}: {text}") from None
        # Counting must see past the window (see pipeline.load_engine).
        count_tokenizer = CLIPTokenizer.from_pretrained(
            str(folder / "tokenizer"), model_max_length=1_000_000
        )
    vae_scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
    # diffusers guesses the trained size from the family; ours knows v vs eps.
    base.unet.register_to_config(sample_size=arch.native_size // vae_scale)
    return base, count_tokenizer

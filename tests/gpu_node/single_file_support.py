"""Single-file checkpoints for tests: the tiny model in the original LDM layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gpu_node import checkpoints

# The tiny model (gpu_node/tiny.py) as an LDM config: what A1111 would want
# beside the file, since no shipped config describes networks this small.
TINY_YAML = """\
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        in_channels: {in_channels}
        out_channels: 4
        model_channels: 32
        attention_resolutions: [2]
        num_res_blocks: 1
        channel_mult: [1, 2]
        num_heads: 4
        use_spatial_transformer: true
        transformer_depth: 1
        context_dim: 32
        legacy: false
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 32
          ch_mult: [1, 1, 2, 2]
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def ldm_state_dict(
    unet: dict[str, torch.Tensor],
    unet_config: dict[str, Any],
    vae: dict[str, torch.Tensor],
    vae_config: dict[str, Any],
    text_encoder: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """SD 1.x diffusers weights under their original LDM names."""
    up_with_attention = {
        index
        for index, kind in enumerate(unet_config["up_block_types"])
        if "CrossAttn" in kind
    }
    layers = int(unet_config["layers_per_block"])
    levels = len(vae_config["block_out_channels"])
    out: dict[str, torch.Tensor] = {}
    for key, value in unet.items():
        out[checkpoints.unet_key(key, layers, up_with_attention)] = value
    for key, value in vae.items():
        name = checkpoints.vae_key(key, levels)
        is_matrix = checkpoints.is_vae_attention_matrix(name)
        out[name] = value[..., None, None] if is_matrix else value
    for key, value in text_encoder.items():
        if key.endswith("position_ids"):
            continue
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        out[f"cond_stage_model.transformer.{name}"] = value
    return out


def folder_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers SD 1.x folder's weights under their original LDM names."""
    return ldm_state_dict(
        load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
        json.loads((folder / "unet" / "config.json").read_text()),
        load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
        json.loads((folder / "vae" / "config.json").read_text()),
        load_file(folder / "text_encoder" / "model.safetensors"),
    )


def write_single_file(
    target: Path,
    tensors: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    yaml: str | None = None,
) -> Path:
    """Save `tensors` as one safetensors file, with `yaml` beside it if given."""
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: value.to(dtype).contiguous() for name, value in tensors.items()},
        str(target),
    )
    if yaml is not None:
        target.with_suffix(".yaml").write_text(yaml)
    return target


def tiny_single_file(
    tiny_folder: Path, target: Path, *, dtype: torch.dtype = torch.float32
) -> Path:
    """The tiny model as one LDM-layout file, its yaml beside it."""
    return write_single_file(
        target,
        folder_state_dict(tiny_folder),
        dtype=dtype,
        yaml=TINY_YAML.format(in_channels=4),
    )

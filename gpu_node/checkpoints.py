"""Single-file checkpoints: what a `.safetensors` file in the LDM/SGM layout is.

Torch-free: it reads a file's header (names, dtypes and shapes, not the
weights), tells its architecture from them or from an A1111 `<name>.yaml`
beside it, and names the keys of the original layout that a diffusers model
corresponds to (to check a file before loading it, and in tests to write one).
`gpu_node.single_file` loads the weights with the configs this package ships.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml

from gpu_node.calls import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# The UNet's first convolution: [channels, latent inputs, 3, 3]; 9 inputs
# (latents, mask, masked-image latents) make an inpainting checkpoint.
FIRST_CONV = f"{UNET_PREFIX}input_blocks.0.0.weight"
INPAINT_CHANNELS = 9
# A safetensors header is a few hundred kilobytes even for SDXL; anything far
# larger is not one.
MAX_HEADER_BYTES = 64 << 20
_CROSS_ATTENTION_KEY = re.compile(rf"^{re.escape(UNET_PREFIX)}.*\.attn2\.to_k\.weight$")

Family = Literal["sd1", "sd2", "sdxl"]
Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class Architecture:
    """What a single file holds and the configs it is built with."""

    family: Family
    inpaint: bool
    prediction: Literal["epsilon", "v_prediction"]
    # The original LDM/SGM config: one this package ships, or the file's own.
    original_config: Path | Traversable
    # Where it came from, for the log: "detected" or the yaml's path.
    source: str

    @property
    def kind(self) -> str:
        """sd1, sd2, sdxl, with `-inpaint` for the 9-channel variants."""
        return f"{self.family}-inpaint" if self.inpaint else self.family

    @property
    def pipeline(self) -> str:
        """The engine's pipeline family: `sd` or `sdxl`."""
        return "sdxl" if self.family == "sdxl" else "sd"

    @property
    def native_size(self) -> int:
        """The side in pixels the model was trained at."""
        if self.family == "sdxl":
            return 1024
        if self.family == "sd2" and self.prediction == "v_prediction":
            return 768
        return 512


def shipped_configs() -> Traversable:
    """The folder of configs this package ships for single files."""
    return resources.files("gpu_node") / "data" / "checkpoints"


def _shipped_yaml(family: Family, inpaint: bool, prediction: str) -> Traversable:
    names = {
        ("sd1", False): "v1-inference.yaml",
        ("sd1", True): "v1-inpainting-inference.yaml",
        ("sd2", False): (
            "v2-inference-v.yaml"
            if prediction == "v_prediction"
            else "v2-inference.yaml"
        ),
        ("sd2", True): "v2-inpainting-inference.yaml",
        ("sdxl", False): "sd_xl_base.yaml",
        ("sdxl", True): "sd_xl_inpaint.yaml",
    }
    return shipped_configs() / names[(family, inpaint)]


def check_suffix(path: Path) -> None:
    """Refuse a file that is not safetensors (a pickle could run code)."""
    if path.suffix != ".safetensors":
        raise ModelError(
            f"model file {path} is not a .safetensors file; sdapi never loads "
            "pickles (.ckpt, .pt, .bin): convert it to safetensors first"
        )


def read_shapes(path: Path) -> Shapes:
    """Tensor names and shapes from a safetensors file's header (no weights read)."""
    check_suffix(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (size,) = struct.unpack("<Q", head)
            if size > MAX_HEADER_BYTES:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(handle.read(size))
        return {
            name: tuple(int(n) for n in entry["shape"])
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"cannot read {path} as safetensors ({exc})") from None


def detect(path: Path, shapes: Shapes) -> Architecture:
    """The architecture of a file from its tensor names and shapes.

    SD 2.x v-prediction is not visible in the weights: without a yaml beside
    it an SD 2.x file is taken as the 768 px v-prediction model (2.0-v, 2.1,
    and most fine-tunes of them); a 512 px epsilon model (2.x-base) needs
    its `v2-inference.yaml` beside it, as in A1111.
    """
    if FIRST_CONV not in shapes:
        raise ModelError(
            f"{path} is not a Stable Diffusion checkpoint in the original layout "
            f"(no {FIRST_CONV})"
        )
    inpaint = len(shapes[FIRST_CONV]) > 1 and (
        shapes[FIRST_CONV][1] == INPAINT_CHANNELS
    )
    context = [
        shape[1]
        for name, shape in shapes.items()
        if _CROSS_ATTENTION_KEY.match(name) and len(shape) == 2
    ]
    family: Family
    if any(name.startswith("conditioner.embedders.") for name in shapes) or (
        f"{UNET_PREFIX}label_emb.0.0.weight" in shapes
    ):
        family = "sdxl"
    elif any(name.startswith("cond_stage_model.model.") for name in shapes) or (
        context and context[0] == 1024
    ):
        family = "sd2"
    elif any(name.startswith("cond_stage_model.transformer.") for name in shapes) or (
        context and context[0] == 768
    ):
        family = "sd1"
    else:
        raise ModelError(
            f"{path} is not a Stable Diffusion 1.x, 2.x or XL checkpoint "
            "(no text encoder of theirs, and no cross-attention of their width)"
        )
    prediction: Literal["epsilon", "v_prediction"] = (
        "v_prediction" if family == "sd2" and not inpaint else "epsilon"
    )
    return Architecture(
        family,
        inpaint,
        prediction,
        _shipped_yaml(family, inpaint, prediction),
        "detected",
    )


def from_yaml(config: Path) -> Architecture:
    """The architecture an A1111 `<name>.yaml` (LDM or SGM layout) describes."""
    try:
        document: Any = yaml.safe_load(config.read_text())
        params = document["model"]["params"]
        network = params.get("network_config") or params["unet_config"]
        in_channels = int(network["params"]["in_channels"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"{config} is not an LDM/SGM model config ({type(exc).__name__}: {exc})"
        ) from None
    family: Family
    if "network_config" in params or "conditioner_config" in params:
        family = "sdxl"
    elif "OpenCLIP" in str((params.get("cond_stage_config") or {}).get("target")):
        family = "sd2"
    else:
        family = "sd1"
    v = params.get("parameterization") == "v"
    return Architecture(
        family,
        in_channels == INPAINT_CHANNELS,
        "v_prediction" if v else "epsilon",
        config,
        str(config),
    )


def architecture(path: Path, shapes: Shapes | None = None) -> Architecture:
    """A file's architecture: its `<name>.yaml` (A1111's convention) wins."""
    beside = path.with_suffix(".yaml")
    if beside.is_file():
        return from_yaml(beside)
    return detect(path, shapes if shapes is not None else read_shapes(path))


# --- the original layout's names for diffusers' parameters ---------------------

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def _resnet(rest: str) -> str:
    part, _, tail = rest.partition(".")
    return f"{_RESNET_PARTS.get(part, part)}.{tail}"


def unet_key(key: str, layers_per_block: int, up_with_attention: set[int]) -> str:
    """The LDM name of a diffusers UNet parameter (SD 1.x, 2.x, XL layouts)."""
    for new, old in _UNET_FIXED.items():
        if key.startswith(new):
            return UNET_PREFIX + old + key[len(new) :]
    per_down = layers_per_block + 1
    # An up block has one resnet more than a down block, each its own output block.
    per_up = layers_per_block + 1
    if found := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = found.groups()
        index = per_down * int(block) + int(layer) + 1
        body = _resnet(rest) if kind == "resnets" else rest
        return (
            f"{UNET_PREFIX}input_blocks.{index}.{0 if kind == 'resnets' else 1}.{body}"
        )
    if found := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        block, rest = found.groups()
        return f"{UNET_PREFIX}input_blocks.{per_down * (int(block) + 1)}.0.op.{rest}"
    if found := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = found.groups()
        index = per_up * int(block) + int(layer)
        body = _resnet(rest) if kind == "resnets" else rest
        return (
            f"{UNET_PREFIX}output_blocks.{index}.{0 if kind == 'resnets' else 1}.{body}"
        )
    if found := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        block, rest = found.groups()
        index = per_up * int(block) + layers_per_block
        slot = 2 if int(block) in up_with_attention else 1
        return f"{UNET_PREFIX}output_blocks.{index}.{slot}.{rest}"
    if found := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        layer, rest = found.groups()
        return f"{UNET_PREFIX}middle_block.{2 * int(layer)}.{_resnet(rest)}"
    if key.startswith("mid_block.attentions.0."):
        return f"{UNET_PREFIX}middle_block.1.{key[len('mid_block.attentions.0.') :]}"
    raise ValueError(f"no LDM name for UNet parameter {key}")


_VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def vae_key(key: str, levels: int) -> str:
    """The LDM name of a diffusers AutoencoderKL parameter."""
    name = key.replace("conv_shortcut", "nin_shortcut").replace(
        "conv_norm_out", "norm_out"
    )
    if found := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(.*)", name):
        name = f"encoder.down.{found[1]}.block.{found[2]}"
    elif found := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", name):
        name = f"encoder.down.{found[1]}.downsample.{found[2]}"
    elif found := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(.*)", name):
        name = f"decoder.up.{levels - 1 - int(found[1])}.block.{found[2]}"
    elif found := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", name):
        name = f"decoder.up.{levels - 1 - int(found[1])}.upsample.{found[2]}"
    elif found := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", name):
        name = f"{found[1]}.mid.block_{int(found[2]) + 1}.{found[3]}"
    elif found := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", name):
        rest = found[2]
        for new, old in _VAE_ATTENTION.items():
            if rest.startswith(new):
                rest = old + rest[len(new) :]
        name = f"{found[1]}.mid.attn_1.{rest}"
    return VAE_PREFIX + name


def is_vae_attention_matrix(ldm_key: str) -> bool:
    """Whether an LDM VAE key is a 1x1 convolution where diffusers has a matrix."""
    return ".mid.attn_1." in ldm_key and ldm_key.endswith(
        ("q.weight", "k.weight", "v.weight", "proj_out.weight")
    )


def text_encoder_prefix(family: Family, index: int) -> str | None:
    """Where a file keeps a Hugging Face-layout CLIP text encoder; None if OpenCLIP."""
    if family == "sd1":
        return "cond_stage_model.transformer."
    if family == "sdxl" and index == 0:
        return "conditioner.embedders.0.transformer."
    return None

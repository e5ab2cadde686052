"""LoRA files for the tiny UNet, in kohya/A1111 and diffusers/PEFT formats."""

from __future__ import annotations

import json
from pathlib import Path

# Attention projections of the tiny UNet: (module, input width, output width).
TINY_TARGETS = (
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 64, 64),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 32, 64),
    ("mid_block.attentions.0.transformer_blocks.0.attn2.to_k", 32, 64),
    ("up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", 32, 64),
)


def write_lora(
    path: Path,
    *,
    fmt: str = "kohya",
    seed: int = 0,
    rank: int = 4,
    scale: float = 0.5,
    targets: tuple[tuple[str, int, int], ...] = TINY_TARGETS,
    tags: dict[str, int] | None = None,
) -> Path:
    """Write a random LoRA for `targets` to `path` (kohya or peft keys)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, width_in, width_out in targets:
        down = torch.randn(rank, width_in, generator=generator) * scale
        up = torch.randn(width_out, rank, generator=generator) * scale
        if fmt == "kohya":
            prefix = "lora_unet_" + module.replace(".", "_")
            tensors[f"{prefix}.lora_down.weight"] = down
            tensors[f"{prefix}.lora_up.weight"] = up
            tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))
        else:
            tensors[f"unet.{module}.lora_A.weight"] = down
            tensors[f"unet.{module}.lora_B.weight"] = up
    metadata = {"ss_network_module": "networks.lora"} if fmt == "kohya" else {}
    if tags:
        metadata["ss_tag_frequency"] = json.dumps({"10_set": tags})
    save_file(tensors, str(path), metadata=metadata)
    return path


def sdxl_targets() -> tuple[tuple[str, int, int], ...]:
    """One cross-attention projection as an SDXL LoRA has it (width 2048)."""
    return (("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 2048, 8),)

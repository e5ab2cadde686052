"""What a GPU node announces (Consul Meta or Redis) and a model's limits."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field


class ModelLimits(BaseModel):
    """A model's defaults and limits: what a node serves, what the API offers."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    max_batch: int = Field(ge=1)
    default_steps: int
    default_guidance: float
    default_scheduler: str
    default_width: int
    default_height: int
    max_width: int
    max_height: int
    schedulers: list[str]

    def limits(self) -> ModelLimits:
        """Only the limits (of a subclass such as `NodeInfo`)."""
        return ModelLimits.model_validate(
            {name: getattr(self, name) for name in ModelLimits.model_fields}
        )

    @classmethod
    def tightest(cls, many: Sequence[ModelLimits]) -> ModelLimits:
        """What all of `many` accept: the smallest limits, the first's defaults."""
        first = many[0]
        schedulers = set(first.schedulers)
        for limits in many[1:]:
            schedulers &= set(limits.schedulers)
        return first.limits().model_copy(
            update={
                "max_batch": min(limits.max_batch for limits in many),
                "max_width": min(limits.max_width for limits in many),
                "max_height": min(limits.max_height for limits in many),
                "schedulers": sorted(schedulers),
            }
        )


# Limits of a model no node has announced yet (Stable Diffusion's usual).
GENERIC_LIMITS = ModelLimits(
    max_batch=4,
    default_steps=25,
    default_guidance=7.5,
    default_scheduler="euler_a",
    default_width=512,
    default_height=512,
    max_width=1024,
    max_height=1024,
    schedulers=["euler", "euler_a", "dpmpp_2m", "ddim", "unipc", "lms", "pndm"],
)


# Consul Meta values hold at most 512 characters: the LoRA list (JSON) is
# cut into numbered keys of this size, at most LORA_META_KEYS of them.
LORA_META_CHUNK = 500
LORA_META_KEYS = 24


class LoraOffer(BaseModel):
    """A LoRA file a node has: its name, the base it is for, its trigger words."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    # sd1, sd2, sdxl (or tiny, dim<N>): the base model's cross-attention width.
    kind: str
    trigger_words: list[str] = []
    sha256: str = ""


class NodeInfo(ModelLimits):
    """What a node serves and how; Consul Meta values are all strings."""

    node_id: str
    model: str
    model_hash: str = ""
    pipeline: str = "sd"
    device: str
    memory_bytes: int = 0
    health_url: str = ""
    # sd1, sd2, sdxl, with `-inpaint` for inpainting models; "" if unknown.
    kind: str = ""
    # Whether the model is in device memory now (else the node has it on disk
    # and loads it for the first job it takes).
    loaded: bool = True
    # The base kind a LoRA must have for this model ("" from older nodes).
    lora_kind: str = ""
    loras: list[LoraOffer] = []

    def to_meta(self) -> dict[str, str]:
        """Flatten to Consul service Meta (string values, keys <= 128 chars)."""
        meta: dict[str, str] = {}
        for key, value in self.model_dump(mode="json", exclude={"loras"}).items():
            if isinstance(value, list):
                meta[key] = ",".join(value)
            elif isinstance(value, bool):
                meta[key] = "true" if value else "false"
            else:
                meta[key] = str(value)
        listed = json.dumps(
            [lora.model_dump(mode="json") for lora in self.loras],
            separators=(",", ":"),
        )
        pieces = [
            listed[i : i + LORA_META_CHUNK]
            for i in range(0, len(listed), LORA_META_CHUNK)
        ]
        if len(pieces) <= LORA_META_KEYS:
            meta.update({f"loras_{i}": piece for i, piece in enumerate(pieces)})
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Self:
        """Inverse of `to_meta`."""
        data = {k: v for k, v in meta.items() if not k.startswith("loras_")}
        schedulers = data.get("schedulers", "")
        data["schedulers"] = [s for s in str(schedulers).split(",") if s]
        listed = "".join(
            str(meta[f"loras_{i}"])
            for i in range(LORA_META_KEYS)
            if f"loras_{i}" in meta
        )
        try:
            data["loras"] = json.loads(listed) if listed else []
        except json.JSONDecodeError:
            data["loras"] = []
        return cls.model_validate(data)

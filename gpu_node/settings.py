"""What a GPU node reads from the environment (SDAPI_* variables)."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from sdapi.contract.catalogue import CatalogueEntry, parse_catalogue
from sdapi.infra.settings import CommonSettings


def _default_node_id() -> str:
    # Two nodes on one host (one per GPU) must not share an id.
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


class GpuNodeSettings(CommonSettings):
    """Settings of `sdapi gpu-node`; node-only names start with SDAPI_GPU_."""

    # `tiny`, a local folder in diffusers layout, or a Hugging Face repo id.
    model: str = "tiny"
    # Name the node serves the model under (queue names, Consul Meta); by
    # default `tiny`, the repo id, or the local folder's name.
    model_name: str | None = None
    # The catalogue: `spec` or `name=spec` entries, comma-separated (web reads
    # the same variable for its known models). Unset: SDAPI_MODEL alone.
    models: str | None = None
    # Unset: <SDAPI_DATA_DIR>/models.
    model_dir: Path | None = None
    # Share of device memory the loaded models may take (their weights);
    # past it, the least recently used one is unloaded.
    gpu_memory_fraction: float = Field(default=0.8, gt=0, le=1)
    # On CPU, the RAM loaded models may take (bytes); unset: the memory
    # fraction of the machine's RAM. 0 keeps one model loaded at a time.
    gpu_ram_budget_bytes: int | None = Field(default=None, ge=0)
    # On a GPU, what models moved out of device memory may take in host RAM
    # (bytes) before the least recently used is dropped; unset: half the
    # machine's RAM. 0: models are dropped at once, as on CPU (where device
    # and host memory are one, so this tier does not exist).
    gpu_host_ram_budget_bytes: int | None = Field(default=None, ge=0)
    # A job for a model that is not loaded is claimed only once it waited this
    # long (seconds): a node that has the model loaded takes it first.
    gpu_cold_claim_delay_s: float = Field(default=2.0, ge=0, le=600)
    # While a loaded model has queued work, a job for an unloaded one waits at
    # most this long (seconds) before the node switches models.
    gpu_switch_after_s: float = Field(default=30.0, ge=0, le=3600)
    gpu_device: Literal["auto", "cpu", "cuda"] = "auto"
    # LoRA files (*.safetensors); unset: <SDAPI_DATA_DIR>/loras. SDAPI_LORA_DIR.
    lora_dir: Path | None = None
    # How often the LoRA folder is looked at for new or changed files (seconds).
    gpu_lora_scan_s: float = Field(default=10.0, gt=0, le=30)
    # Images per pipeline call; unset: 4 on CPU, 8 on CUDA.
    gpu_max_batch: int | None = Field(default=None, ge=1, le=64)
    # Largest width/height served; unset: twice the model's native size.
    gpu_max_size: int | None = Field(default=None, ge=64, le=4096, multiple_of=8)
    gpu_default_steps: int | None = Field(default=None, ge=1, le=500)
    gpu_default_scheduler: str | None = None
    # Latent previews every N denoising steps (0: none).
    gpu_preview_every: int = Field(default=5, ge=0)
    # Progress events at most this often (seconds; 0: every step). The last
    # step is always sent; 20 a second is more than a progress bar can show.
    gpu_progress_interval_s: float = Field(default=0.05, ge=0, le=10)
    node_id: str = Field(default_factory=_default_node_id, min_length=1, max_length=100)
    gpu_health_host: str = "127.0.0.1"
    # 0: pick a free port and log it.
    gpu_health_port: int = Field(default=0, ge=0, le=65535)
    # Host others reach this node's health port on; unset: the health host,
    # or this machine's name when listening on every interface.
    gpu_advertise_host: str | None = None
    # arq poll delays (seconds). Producers publish a wake-up with every job
    # and a finished job looks for the next at once, so polls only catch a
    # wake-up lost while Redis restarted.
    gpu_premium_poll_s: float = Field(default=0.25, gt=0, le=5)
    gpu_batch_poll_s: float = Field(default=0.5, gt=0, le=5)
    # A job's time limit: base + steps x images x this, scaled by its size
    # relative to 512x512 (seconds); past it, the call stops at a step boundary.
    gpu_timeout_base_s: float = Field(default=60.0, gt=0)
    gpu_timeout_per_image_step_s: float = Field(default=2.0, ge=0)
    # How long a claimed job stays claimed without a refresh (seconds): after a
    # SIGKILL its job is picked up again within about this long.
    gpu_job_lease_s: float = Field(default=20.0, ge=2, le=3600)
    gpu_max_tries: int = Field(default=3, ge=1, le=20)
    # On SIGTERM, how long the running jobs may take before they are re-queued.
    gpu_drain_grace_s: float = Field(default=60.0, ge=0)
    # How often the node refreshes its Redis key and Consul TTL check (seconds).
    gpu_announce_every_s: float = Field(default=5.0, gt=0, le=60)
    # Consul marks the node critical when its TTL check is not passed within
    # this long (seconds): at least twice the announce interval.
    gpu_consul_ttl_s: int = Field(default=15, ge=1, le=3600)
    gpu_consul_deregister_after_s: int = Field(default=60, ge=1)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("must be `tiny`, a model folder or a Hugging Face repo id")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_catalogue(value)
        return value

    @field_validator("gpu_consul_ttl_s")
    @classmethod
    def _consul_ttl(cls, value: int, info: ValidationInfo) -> int:
        every = info.data.get("gpu_announce_every_s")
        if every is not None and value < 2 * every:
            raise ValueError(
                f"must be at least twice SDAPI_GPU_ANNOUNCE_EVERY_S ({every:g} s), "
                "or the node flaps between passing and critical"
            )
        return value

    @field_validator("gpu_default_scheduler", "model_name")
    @classmethod
    def _optional_name(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @property
    def catalogue(self) -> list[CatalogueEntry]:
        """What this node may serve, the first being its primary model."""
        if self.models is not None:
            entries = parse_catalogue(self.models)
            if entries:
                return entries
        return [CatalogueEntry(self.model_name, self.model)]

    @property
    def models_path(self) -> Path:
        """Where models are downloaded to and the tiny model is made."""
        return (
            self.model_dir if self.model_dir is not None else self.data_dir / "models"
        )

    @property
    def lora_path(self) -> Path:
        """The folder of LoRA files."""
        return self.lora_dir if self.lora_dir is not None else self.data_dir / "loras"

    @property
    def advertise_host(self) -> str:
        """The host name other processes use to reach this node."""
        if self.gpu_advertise_host:
            return self.gpu_advertise_host
        if self.gpu_health_host in {"0.0.0.0", "::", ""}:  # noqa: S104
            return socket.gethostname()
        return self.gpu_health_host

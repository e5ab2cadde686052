"""Settings of the web process, built once in `web.main` and passed down."""

from __future__ import annotations

import socket
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import NoDecode

from gpu_node.schemas import Tier
from sdapi.settings import CommonSettings


class TierLimits(BaseModel):
    """What one tier may ask for; `/me` lists these."""

    max_size: int
    max_steps: int
    max_images: int
    images_per_day: int
    # Requests queued or running at once; None: bounded by the daily quota only.
    max_in_flight: int | None


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class WebSettings(CommonSettings):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # The address Consul and other services reach this replica at; defaults
    # to `host`, or this machine's name when listening on every interface.
    advertise_host: str | None = None
    # Base of links in emails and of image URLs; defaults to http://host:port.
    public_url: str | None = None
    normal_delay: int = Field(default=1800, ge=0, description="seconds")
    bcrypt_rounds: int = Field(default=12, ge=4, le=16)
    token_ttl: int = Field(default=30 * 24 * 3600, ge=60, description="seconds")
    session_ttl: int = Field(default=7 * 24 * 3600, ge=60, description="seconds")
    verify_ttl: int = Field(default=3 * 24 * 3600, ge=60, description="seconds")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_ws_message_bytes: int = Field(default=64 * 1024, ge=1024)
    # WebSocket ping interval; a client that misses a pong for half of it is
    # dropped (seconds).
    ws_heartbeat: float = Field(default=30.0, gt=0, description="seconds")
    # How long POST /v1/images/generations waits for its images before it
    # cancels the generation and answers 504 (seconds).
    openai_timeout: float = Field(default=300.0, gt=0, description="seconds")
    # How long the `url`s it answers with work without credentials (seconds).
    openai_url_ttl: int = Field(default=3600, ge=60, description="seconds")
    # Trust X-Forwarded-For / X-Forwarded-Proto (only behind a proxy you run).
    trust_forwarded: bool = False
    # Origins allowed to use the session cookie (WebSocket, forms) besides
    # public_url's own.
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Models accepted for the normal tier even while no node serves them.
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["tiny"])
    signin_max_failures_per_email: int = Field(default=10, ge=1)
    signin_max_failures_per_client: int = Field(default=50, ge=1)
    signin_failure_window: int = Field(default=900, ge=1, description="seconds")

    normal_max_size: int = Field(default=512, ge=64)
    normal_max_steps: int = Field(default=50, ge=1)
    normal_max_images: int = Field(default=4, ge=1)
    normal_images_per_day: int = Field(default=50, ge=1)
    premium_max_size: int = Field(default=1024, ge=64)
    premium_max_steps: int = Field(default=150, ge=1)
    premium_max_images: int = Field(default=8, ge=1)
    premium_images_per_day: int = Field(default=2000, ge=1)
    premium_max_in_flight: int = Field(default=4, ge=1)

    _split = field_validator("allowed_origins", "models", mode="before")(_split_csv)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("must be an http(s)://host[:port] URL")
        return value.rstrip("/")

    def limits(self, tier: Tier) -> TierLimits:
        """The limits of `tier`."""
        if tier is Tier.PREMIUM:
            return TierLimits(
                max_size=self.premium_max_size,
                max_steps=self.premium_max_steps,
                max_images=self.premium_max_images,
                images_per_day=self.premium_images_per_day,
                max_in_flight=self.premium_max_in_flight,
            )
        return TierLimits(
            max_size=self.normal_max_size,
            max_steps=self.normal_max_steps,
            max_images=self.normal_max_images,
            images_per_day=self.normal_images_per_day,
            max_in_flight=None,
        )

    @property
    def base_url(self) -> str:
        """public_url, or where this process listens."""
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def advertised_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        if self.host in {"0.0.0.0", "::", ""}:  # noqa: S104 (a comparison)
            return socket.gethostname()
        return self.host

    @property
    def secure_cookies(self) -> bool:
        return self.base_url.startswith("https://")

    def origins(self) -> frozenset[str]:
        """Origins whose pages may use the session cookie."""
        parts = urlsplit(self.base_url)
        return frozenset([f"{parts.scheme}://{parts.netloc}", *self.allowed_origins])

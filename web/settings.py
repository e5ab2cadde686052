"""Settings of the web process, built once in `web.main` and passed down."""

from __future__ import annotations

import socket
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from sdapi.contract.catalogue import parse_catalogue, served_name
from sdapi.contract.payloads import IMAGES_MAX, SIZE_MAX, STEPS_MAX
from sdapi.contract.status import Tier
from sdapi.infra.settings import CommonSettings, http_url


class TierLimits(BaseModel):
    """What one tier may ask for; `/me` lists these."""

    max_size: int
    max_steps: int
    max_images: int
    images_per_day: int
    # Requests queued or running at once; None: bounded by the daily quota only.
    max_in_flight: int | None
    # One uploaded input image: its file size and its pixels (checked before
    # it is decoded).
    max_upload_bytes: int
    max_upload_pixels: int


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _model_names(value: object) -> object:
    # SDAPI_MODELS is also the GPU nodes' catalogue: `name=spec` entries are
    # known by their name, others by what the spec is named after.
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [
            served_name(entry) for item in value for entry in parse_catalogue(str(item))
        ]
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
    # Accept webhook URLs that reach loopback, private, link-local or metadata
    # addresses (development only; jobs has the same setting for sending).
    webhook_allow_private: bool = False
    # How long resolving a webhook URL's host may take on the request path.
    webhook_resolve_timeout: float = Field(default=2.0, gt=0)
    bcrypt_rounds: int = Field(default=12, ge=4, le=16)
    token_ttl: int = Field(default=30 * 24 * 3600, ge=60, description="seconds")
    session_ttl: int = Field(default=7 * 24 * 3600, ge=60, description="seconds")
    verify_ttl: int = Field(default=3 * 24 * 3600, ge=60, description="seconds")
    # An account never verified this long after sign-up no longer holds its
    # address: a new sign-up with it replaces the account.
    unverified_takeover_after: int = Field(
        default=24 * 3600, ge=0, description="seconds"
    )
    # How long a password reset link works.
    password_reset_ttl: int = Field(default=3600, ge=60, description="seconds")
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
    # The same for POST /sdapi/v1/txt2img and img2img (seconds).
    a1111_timeout: float = Field(default=300.0, gt=0, description="seconds")
    # Take the client address from X-Forwarded-For (only behind a proxy you
    # run); it is what sign-in and sign-up throttling count by.
    trust_forwarded: bool = False
    # Origins allowed to use the session cookie (WebSocket, forms) besides
    # public_url's own.
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Models accepted, and queued, even while no node serves them (scaled to
    # zero, restarting); the first is the default model.
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["tiny"])
    # Who may read /metrics: with a token, a scraper that sends it as a
    # bearer token; without one, clients on this host only.
    metrics_token: SecretStr | None = None
    # A model a node served within this long is accepted the same way.
    known_model_ttl: int = Field(default=24 * 3600, ge=0, description="seconds")
    # Failed sign-ins allowed per client and account name, per client, and
    # per device cookie, within the failure window (docs/SIGN_IN.md).
    signin_max_failures_per_email: int = Field(default=10, ge=1)
    signin_max_failures_per_client: int = Field(default=50, ge=1)
    signin_failure_window: int = Field(default=900, ge=1, description="seconds")
    # Failed sign-ins of one account from anywhere (device cookies aside)
    # within the global window before each further attempt is delayed: by
    # the backoff delay after the newest, doubling per failure, at most the
    # cap. Slowed down, never locked: others cannot shut the owner out.
    signin_max_failures_per_email_global: int = Field(default=20, ge=1)
    signin_global_failure_window: int = Field(default=3600, ge=1, description="seconds")
    signin_backoff_delay: float = Field(default=1.0, gt=0, description="seconds")
    signin_backoff_cap: float = Field(default=60.0, gt=0, description="seconds")
    # How long a browser's device cookie keeps it known to its account.
    signin_device_ttl: int = Field(default=90 * 24 * 3600, ge=60, description="seconds")
    # Password reset attempts per client address and per token (each valid
    # one costs a bcrypt hash), within the reset window.
    password_reset_max_per_client: int = Field(default=10, ge=1)
    password_reset_max_per_token: int = Field(default=3, ge=1)
    password_reset_window: int = Field(default=900, ge=1, description="seconds")
    # Sign-ups (each costs a bcrypt hash and an email) per client address.
    signup_max_per_client: int = Field(default=20, ge=1)
    signup_window: int = Field(default=3600, ge=1, description="seconds")
    # Password hashes and checks running at once; more wait their turn, so a
    # burst of sign-ins cannot queue unbounded bcrypt work on the threads.
    bcrypt_concurrency: int = Field(default=4, ge=1)
    # Connections of the Redis pool that requests use (a request over it gets
    # a 503), and of the separate pool that WebSocket relays wait on with
    # blocking reads (a relay over it waits for a free connection).
    redis_max_connections: int = Field(default=64, ge=2)
    live_redis_connections: int = Field(default=64, ge=1)
    # Generations one WebSocket may follow at once, and WebSockets one user
    # may hold open on this process.
    ws_max_relays: int = Field(default=32, ge=1)
    ws_max_sockets_per_user: int = Field(default=8, ge=1)
    # How often an open WebSocket re-checks that its token is still valid
    # (seconds); a revoked or expired one closes it with 1008.
    ws_recheck_s: float = Field(default=30.0, gt=0, description="seconds")
    # Bearer tokens (with their users) a replica keeps between requests, and
    # for how long at most (seconds); revocations reach it by broadcast at
    # once, and an entry older than this is read again. 0 turns it off.
    token_cache_size: int = Field(default=10_000, ge=0)
    token_cache_ttl_s: float = Field(default=5.0, gt=0, description="seconds")
    # Client messages one socket may send: a steady rate, and a burst.
    ws_messages_per_s: float = Field(default=10.0, gt=0)
    ws_message_burst: int = Field(default=40, ge=1)
    # Verification emails one user may ask to be re-sent: one per this long.
    verify_resend_interval: int = Field(default=60, ge=1, description="seconds")
    # Verification emails an account may ask for again, a day.
    verify_resend_per_day: int = Field(default=5, ge=1)
    # How long a call to the Consul agent may take (seconds).
    consul_timeout: float = Field(default=3.0, gt=0, description="seconds")
    # Deadlines of one PostgreSQL statement, and of all the Redis work of one
    # request: past them the request is a 503 with Retry-After (or, where
    # Redis only adds live details, answers without them).
    db_timeout: float = Field(default=3.0, gt=0, description="seconds")
    redis_timeout: float = Field(default=2.0, gt=0, description="seconds")
    # Threads that decode uploaded images, how many of them one user may hold
    # (running or waiting), and how long a request waits for one (seconds)
    # before a 429 (its user's share is full) or a 503 (all are busy).
    decode_workers: int = Field(default=2, ge=1)
    decode_per_user: int = Field(default=1, ge=1)
    decode_wait: float = Field(default=5.0, gt=0, description="seconds")

    # Deadlines of a connection: its request headers (from the connection or
    # the first byte of a request), a pause in a body being read, and an idle
    # kept-alive connection (seconds); past them it is closed.
    header_read_timeout: float = Field(default=10.0, gt=0, description="seconds")
    body_read_timeout: float = Field(default=30.0, gt=0, description="seconds")
    keepalive_timeout: float = Field(default=75.0, gt=0, description="seconds")
    # Connections one client address (an IPv6 /64) may hold open; one more is
    # answered 429 and closed. 0: no cap; off with trust_forwarded, where
    # every connection comes from the proxy (which then caps them).
    max_connections_per_client: int = Field(default=64, ge=0)

    # Tier limits; never above what a GPU node accepts (sdapi.contract).
    normal_max_size: int = Field(default=512, ge=64, le=SIZE_MAX)
    normal_max_steps: int = Field(default=50, ge=1, le=STEPS_MAX)
    normal_max_images: int = Field(default=4, ge=1, le=IMAGES_MAX)
    normal_images_per_day: int = Field(default=50, ge=1)
    premium_max_size: int = Field(default=1024, ge=64, le=SIZE_MAX)
    premium_max_steps: int = Field(default=150, ge=1, le=STEPS_MAX)
    premium_max_images: int = Field(default=8, ge=1, le=IMAGES_MAX)
    premium_images_per_day: int = Field(default=2000, ge=1)
    premium_max_in_flight: int = Field(default=4, ge=1)
    normal_max_upload_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    normal_max_upload_pixels: int = Field(default=2048 * 2048, ge=64 * 64)
    premium_max_upload_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    premium_max_upload_pixels: int = Field(default=4096 * 4096, ge=64 * 64)

    _split = field_validator("allowed_origins", mode="before")(_split_csv)
    _names = field_validator("models", mode="before")(_model_names)

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        return http_url(value) if value else None

    @property
    def upload_body_bytes(self) -> int:
        """Largest body of a request carrying images: two of the largest
        uploads, base64-encoded (4 bytes per 3), and the other fields."""
        return self.premium_max_upload_bytes * 2 * 4 // 3 + self.max_body_bytes

    def limits(self, tier: Tier) -> TierLimits:
        """The limits of `tier`."""
        if tier is Tier.PREMIUM:
            return TierLimits(
                max_size=self.premium_max_size,
                max_steps=self.premium_max_steps,
                max_images=self.premium_max_images,
                images_per_day=self.premium_images_per_day,
                max_in_flight=self.premium_max_in_flight,
                max_upload_bytes=self.premium_max_upload_bytes,
                max_upload_pixels=self.premium_max_upload_pixels,
            )
        return TierLimits(
            max_size=self.normal_max_size,
            max_steps=self.normal_max_steps,
            max_images=self.normal_max_images,
            images_per_day=self.normal_images_per_day,
            max_in_flight=None,
            max_upload_bytes=self.normal_max_upload_bytes,
            max_upload_pixels=self.normal_max_upload_pixels,
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

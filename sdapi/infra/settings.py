"""What every sdapi process reads from the environment, and how a bad value fails."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sdapi.infra.consul import ServiceNotFound, resolve_service_url, service_name
from sdapi.infra.local_services import running_services
from sdapi.infra.object_store import BadStoreUrl, parse_store_url

ENV_PREFIX = "SDAPI_"


class SettingsError(Exception):
    """A setting is missing or malformed; the message is one line naming it."""


def http_url(value: str, what: str = "an http(s)://host[:port] URL") -> str:
    """`value` without a trailing slash if it is an http(s) URL with a host."""
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"must be {what}")
    return value.rstrip("/")


class CommonSettings(BaseSettings):
    """Settings shared by every process; each package subclasses this once."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    # Unset: `sdapi dev` (or the test suite) provides embedded servers.
    database_url: str | None = None
    redis_url: str | None = None
    # Unset: no Consul; nodes announce themselves through Redis instead.
    consul_url: str | None = None
    data_dir: Path = Path(".sdapi")
    log_level: str = "INFO"
    # Keys the password pre-hash and signs download links in emails; every web
    # and jobs process of a deployment needs the same one, so it must be set
    # whenever SDAPI_DATABASE_URL is. Unset (`sdapi dev`, the tests): generated
    # once and kept in SDAPI_DATA_DIR/secret_key.
    secret_key: SecretStr | None = None
    # How long queued or running work may go unchecked before the reconciler
    # asks whether its job is still alive (seconds); live work is left alone.
    # `web` sets it on the premium rows it queues, `jobs` on everything else.
    queued_check_after: float = Field(default=60.0, gt=0)
    # Where new image bytes go (sdapi.infra.object_store): `postgres` (the
    # database itself), `file:///path` or `s3://bucket/prefix?endpoint=URL&
    # region=NAME` with credentials from the AWS_* variables. Images already
    # stored stay readable where their rows say they are.
    storage_url: str = "postgres"
    # Downloads answer 302 to a presigned URL (S3 only) instead of streaming.
    storage_redirect: bool = False
    # How long a presigned download URL works (seconds).
    storage_presign_s: int = Field(default=300, ge=10, le=3600)
    # The deadline of one object store call (seconds).
    storage_timeout: float = Field(default=5.0, gt=0, le=60)

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = urlsplit(value).scheme
        if scheme not in {"postgres", "postgresql"}:
            raise ValueError("must be a postgres://user:password@host:port/db URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"redis", "rediss", "unix"}:
            raise ValueError("must be a redis://host:port/db URL")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("must name a host, as in redis://host:port/db")
        return value

    @field_validator("consul_url")
    @classmethod
    def _consul_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        return http_url(value, "an http://host:port URL of a Consul agent")

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, value: str) -> str:
        try:
            return parse_store_url(value).location
        except BadStoreUrl as exc:
            raise ValueError(str(exc)) from None

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    def resolved(self) -> Self:
        """A copy with the database, Redis and secret key filled in (at start-up).

        Unset URLs come from a `sdapi dev` running in the data folder; an unset
        secret key from the data folder's own, unless SDAPI_DATABASE_URL is set:
        a deployment's processes run on several hosts and must share one key.
        """
        if self.database_url and self.secret_key is None:
            raise SettingsError(
                "SDAPI_SECRET_KEY must be set when SDAPI_DATABASE_URL is: every "
                "web and jobs process of a deployment needs the same key"
            )
        database_url = require_database_url(self.database_url, self.data_dir)
        redis_url = require_redis_url(self.redis_url, self.data_dir)
        return self.model_copy(
            update={
                "database_url": self.via_consul(database_url, "SDAPI_DATABASE_URL"),
                "redis_url": self.via_consul(redis_url, "SDAPI_REDIS_URL"),
                "secret_key": self.secret_key
                or SecretStr(load_secret_key(self.data_dir)),
            }
        )

    def via_consul(self, url: str, variable: str) -> str:
        """`url`, a `<name>.service.consul` host in it looked up in Consul
        (with SDAPI_CONSUL_URL set; blocking, for start-up)."""
        if not self.consul_url or service_name(urlsplit(url).hostname) is None:
            return url
        try:
            return resolve_service_url(url, self.consul_url)
        except ServiceNotFound as exc:
            raise SettingsError(f"{variable}: {exc}") from None

    def secret(self) -> str:
        """The secret key's value; raises SettingsError when it is not set."""
        if self.secret_key is None:
            raise SettingsError("SDAPI_SECRET_KEY is not set")
        return self.secret_key.get_secret_value()

    @classmethod
    def from_env(cls, **overrides: object) -> Self:
        """Build the settings from the environment, or raise a one-line error."""
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise SettingsError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first bad variable, as an operator would type it."""
    error = exc.errors()[0]
    field = ".".join(str(part) for part in error["loc"]) or "?"
    name = ENV_PREFIX + field.upper()
    value = error.get("input")
    secret = any(word in field for word in ("secret", "password", "url"))
    shown = f"={value!r}" if isinstance(value, str | int | float) and not secret else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"bad setting {name}{shown}: {message}"


def load_secret_key(data_dir: Path) -> str:
    """The data folder's secret key, created (mode 0600) the first time.

    The key is written to a file of its own and then linked into place, so a
    process starting at the same moment reads either no key (and races to link
    its own, losing to the first) or the whole key, never an empty file.
    """
    path = data_dir / "secret_key"
    try:
        return _read_secret_key(path)
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    partial = data_dir / f".secret_key.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(key)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(partial, path)
        except FileExistsError:
            return _read_secret_key(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return key


def _read_secret_key(path: Path) -> str:
    key = path.read_text(encoding="ascii").strip()
    if not key:
        raise SettingsError(
            f"{path} is empty: delete it to have a new key made, or set "
            "SDAPI_SECRET_KEY"
        )
    return key


def require_redis_url(configured: str | None, data_dir: Path) -> str:
    """SDAPI_REDIS_URL, else the Valkey of a `sdapi dev` running in `data_dir`."""
    if configured:
        return configured
    running = running_services(data_dir)
    if running is None:
        raise SettingsError(
            "SDAPI_REDIS_URL is not set and no `sdapi dev` is running with "
            f"SDAPI_DATA_DIR={data_dir}"
        )
    return running.redis_url


def require_database_url(configured: str | None, data_dir: Path) -> str:
    """SDAPI_DATABASE_URL, else the PostgreSQL of a `sdapi dev` in `data_dir`."""
    if configured:
        return configured
    running = running_services(data_dir)
    if running is None:
        raise SettingsError(
            "SDAPI_DATABASE_URL is not set and no `sdapi dev` is running with "
            f"SDAPI_DATA_DIR={data_dir}"
        )
    return running.database_url

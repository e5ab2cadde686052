"""A bad setting stops a process at start with one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdapi.settings import SettingsError
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
        ("SDAPI_NORMAL_DELAY", "-5", "web"),
        ("SDAPI_CONSUL_URL", "consul:8500", "web"),
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

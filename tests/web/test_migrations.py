"""The migrations describe the models exactly: no change is left unwritten."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Run apart: Tortoise's autodetector needs an initialised Tortoise of its own.
_DETECT = """
import asyncio
from tortoise import Tortoise
from tortoise.migrations.autodetector import MigrationAutodetector
from sdapi.db.connection import tortoise_config

async def main():
    config = tortoise_config("postgres://unused/unused")
    # The models' state needs no server: an in-memory SQLite is enough.
    config["connections"]["default"] = "sqlite://:memory:"  # allowed: no data
    await Tortoise.init(config=config)
    try:
        detector = MigrationAutodetector(Tortoise.apps, config["apps"])
        for writer in await detector.changes():
            for operation in writer.operations:
                print(type(operation).__name__, vars(operation))
    finally:
        await Tortoise.close_connections()

asyncio.run(main())
"""


def test_the_models_need_no_new_migration() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _DETECT],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "", "the models changed without a migration:\n" + done.stdout

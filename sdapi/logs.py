"""Logging set-up shared by the processes: one line per record on stderr."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    """Configure the root logger once per process."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # arq and asyncpg are chatty at INFO about every job and connection.
    logging.getLogger("arq.worker").setLevel(
        max(logging.getLevelName(level), logging.INFO)
    )

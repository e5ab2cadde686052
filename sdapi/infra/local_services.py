"""Where a running `sdapi dev` says its embedded servers listen.

`sdapi dev` writes SERVICES_FILE into its data folder; a process started
without SDAPI_DATABASE_URL or SDAPI_REDIS_URL reads it here, so an operator
command or a second node attaches to that dev's servers. Reading the file needs
none of the embedded servers' code (`sdapi.devtools`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SERVICES_FILE = "services.json"


@dataclass(frozen=True)
class ServiceUrls:
    """Where the embedded servers of one data folder listen."""

    database_url: str
    redis_url: str
    owner_pid: int


def running_services(data_dir: Path) -> ServiceUrls | None:
    """The services a live `sdapi dev` advertises in `data_dir`, if any."""
    path = data_dir.resolve() / SERVICES_FILE
    try:
        urls = ServiceUrls(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    try:
        os.kill(urls.owner_pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return urls

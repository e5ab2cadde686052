"""The images' HEALTHCHECK: GET the process's own health endpoint.

`web` answers /healthz on SDAPI_PORT, `gpu-node` on SDAPI_GPU_HEALTH_PORT.
`jobs` and `migrate` serve no port: while PID 1 runs they are up, and the
orchestrator restarts them when they exit.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

PORTS = {"web": ("SDAPI_PORT", "8080"), "gpu-node": ("SDAPI_GPU_HEALTH_PORT", "9090")}


def main() -> int:
    command = Path("/proc/1/cmdline").read_bytes().split(b"\0")
    words = [word.decode() for word in command if word]
    process = next((word for word in words if word in PORTS), None)
    if process is None:
        return 0
    variable, default = PORTS[process]
    url = f"http://127.0.0.1:{os.environ.get(variable, default)}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())

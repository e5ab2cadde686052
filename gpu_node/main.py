"""`sdapi gpu-node`: settings once, then the node until SIGTERM."""

from __future__ import annotations

import logging
import sys

from gpu_node.calls import ModelError
from gpu_node.settings import GpuNodeSettings
from sdapi.infra import loops
from sdapi.infra.logs import setup_logging
from sdapi.infra.settings import require_redis_url

log = logging.getLogger("gpu_node")


def run() -> int:
    """Run a GPU node serving SDAPI_MODEL; 0 after a graceful stop, 2 bad model."""
    settings = GpuNodeSettings.from_env()
    redis_url = settings.via_consul(
        require_redis_url(settings.redis_url, settings.data_dir), "SDAPI_REDIS_URL"
    )
    setup_logging(settings.log_level)
    from gpu_node.node import run_node

    try:
        ok = loops.run(run_node(settings, redis_url))
    except ModelError as exc:
        print(f"sdapi: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    return 0 if ok else 1

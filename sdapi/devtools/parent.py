"""Children of `sdapi dev` stop when it dies, however it dies."""

from __future__ import annotations

import os
import threading
import time

from sdapi.devtools.embedded import die_with_parent

# Set by `sdapi dev` to its own pid in its children's environment: they stop
# when dev dies, however it dies (no orphans holding ports after a closed
# terminal or a SIGKILL). Linux signals them SIGTERM at once; elsewhere they
# notice within PARENT_POLL_S and signal themselves.
PARENT_PID_ENV = "SDAPI_DEV_PARENT_PID"
PARENT_POLL_S = 0.5
# An orphan's graceful stop gets this long before the process just exits
# (seconds): dev's Valkey went with dev, so waiting on it is pointless.
ORPHAN_GRACE_S = 5.0


def tie_to_parent() -> None:
    """Die with the `sdapi dev` that started this process (see PARENT_PID_ENV)."""
    # Popped, so that nothing this process starts inherits it.
    value = os.environ.pop(PARENT_PID_ENV, "")
    if not value.isdigit():
        return
    parent = int(value)
    signalled = die_with_parent(parent)
    threading.Thread(
        target=_watch_parent,
        args=(parent, signalled),
        name="sdapi-parent",
        daemon=True,
    ).start()


def _watch_parent(parent: int, signalled: bool) -> None:
    """Once `parent` is gone: stop gracefully, and for sure after the grace."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    if not signalled:
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(ORPHAN_GRACE_S)
    os._exit(1)

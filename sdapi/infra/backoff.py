"""The one exponential backoff: what every retry loop in sdapi waits between tries."""

from __future__ import annotations

import random

# 2**60 times any base is past every cap; a larger exponent would only risk
# overflowing a float.
MAX_EXPONENT = 60


def backoff_s(attempts: int, *, base: float, cap: float, jitter: float = 0.0) -> float:
    """Seconds to wait after `attempts` failed tries (1, 2, ...).

    `base`, then twice that per further try, never more than `cap`; `jitter`
    takes up to that fraction off at random, so that many clients that failed
    together do not retry together.
    """
    exponent = min(max(attempts - 1, 0), MAX_EXPONENT)
    delay = min(cap, base * 2.0**exponent)
    if not jitter:
        return delay
    # Not security-relevant randomness: it only spreads retries out.
    return delay * (1.0 - random.uniform(0.0, jitter))  # noqa: S311

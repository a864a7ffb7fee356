"""When to try again after a dropped connection: shared by both front ends."""

from __future__ import annotations

import random
from collections.abc import Iterator

BACKOFF_FIRST = 0.5  # seconds before the first reconnect attempt
BACKOFF_MAX = 30.0


def backoff_delays(rng: random.Random | None = None) -> Iterator[float]:
    """Exponential backoff with full jitter in [d/2, d]: many clients dropped by one server
    restart do not all come back in the same instant."""
    rng = rng or random.Random()  # noqa: S311 - jitter for timing, not a secret
    delay = BACKOFF_FIRST
    while True:
        yield rng.uniform(delay / 2, delay)
        delay = min(delay * 2, BACKOFF_MAX)

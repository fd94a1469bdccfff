"""The core's clock seam: wall time (last use, idle timeouts) and monotonic time (backoff,
residency). Injected by the factory, so a test can move time instead of waiting for it."""

from __future__ import annotations

import time


class Clock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

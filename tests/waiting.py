"""Waiting on a condition, never sleeping and then asserting: the deadline only bounds a hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Return as soon as ``condition()`` is true, from the event loop; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 60.0, interval: float = 0.05) -> None:
    """``until`` for code outside an event loop (a thread, a test against a server process)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(interval)

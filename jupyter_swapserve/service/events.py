"""Change notification: many waiters, no lost wake-ups (each version has its own event)."""

from __future__ import annotations

import asyncio
import contextlib


class Notifier:
    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout: float | None = None, since: int | None = None) -> int:
        """Wait for a change after version ``since`` (default: now). Returns the new version."""
        if since is not None and since != self.version:
            return self.version
        event = self._event
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        return self.version

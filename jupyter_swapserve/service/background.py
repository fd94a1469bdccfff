"""Tasks the service runs on its own (an eviction that must outlive the request that caused it, a
prefetch, a kernel's booking): kept referenced while they run, cancelled together at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Background:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` in a task of its own. ``what``: its failure is logged (as a warning, with
        that description) instead of being left in the task for its awaiter."""
        if what is not None:
            coro = self._logged(coro, what)
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @staticmethod
    async def _logged(coro: Coroutine[Any, Any, Any], what: str) -> None:
        try:
            await coro
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)

    async def close(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

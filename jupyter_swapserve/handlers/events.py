"""GET /swapserve/api/events: the status document as server-sent events, on every change."""

from __future__ import annotations

import asyncio
import json

from tornado.iostream import StreamClosedError

from .admin import viewer_status
from .base import SwapServeHandler

MIN_INTERVAL = 0.1  # at most ten updates a second, however busy the service
KEEPALIVE = 15.0


class EventsHandler(SwapServeHandler):
    def on_connection_close(self) -> None:
        self._closed = True
        if getattr(self, "_task", None) is not None:
            self._task.cancel()

    async def get(self) -> None:
        self.require_user("read")
        self._closed = False
        self._task = asyncio.current_task()
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        notifier = self.service.notifier
        version = -1
        try:
            while not self._closed:
                if version != notifier.version:
                    version = notifier.version
                    status = viewer_status(self)
                    self.write(f"event: status\ndata: {json.dumps(status)}\n\n")
                    await self.flush()
                    await asyncio.sleep(MIN_INTERVAL)
                    continue
                before = notifier.version
                if await notifier.wait(KEEPALIVE, since=before) == before:
                    self.write(": keepalive\n\n")
                    await self.flush()
        except (StreamClosedError, asyncio.CancelledError):
            return

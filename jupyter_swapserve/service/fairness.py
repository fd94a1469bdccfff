"""Fair order within a model's queue: weighted fair queueing across users.

Each user's requests are tagged with a virtual finish time: ``start + 1 / weight``, where
``start`` is the later of the queue's virtual clock and the user's previous finish tag. The
queue serves the smallest tag first (ties: arrival order). One user's loop of 500 requests
therefore interleaves with another user's single request instead of being served ahead of it,
and a user with priority 2 gets twice the share of a user with priority 1 while both wait.
:class:`FairQueue` is the pure ordering; :class:`FairSlots` grants an engine's concurrency
slots in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
ANONYMOUS_FLOW = ""


@dataclass(order=True)
class _Entry(Generic[T]):
    finish: float
    seq: int
    user: str = field(compare=False)
    start: float = field(compare=False)
    item: T = field(compare=False)
    removed: bool = field(default=False, compare=False)


class FairQueue(Generic[T]):
    """Weighted fair queueing over users (start-time tags, finish-tag order)."""

    def __init__(self) -> None:
        self._heap: list[_Entry[T]] = []
        self._entries: dict[int, _Entry[T]] = {}
        self._last_finish: dict[str, float] = {}
        self._waiting: dict[str, int] = {}
        self._clock = 0.0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def push(self, user: str, weight: float, item: T) -> int:
        """Queue ``item`` for ``user``; returns a handle for :meth:`remove`."""
        weight = weight if weight > 0 else 1.0
        start = max(self._clock, self._last_finish.get(user, 0.0))
        entry = _Entry(start + 1.0 / weight, next(self._seq), user, start, item)
        self._last_finish[user] = entry.finish
        self._waiting[user] = self._waiting.get(user, 0) + 1
        heapq.heappush(self._heap, entry)
        self._entries[entry.seq] = entry
        return entry.seq

    def pop(self) -> T:
        while self._heap:
            entry = heapq.heappop(self._heap)
            if entry.removed:
                continue
            self._forget(entry)
            self._clock = max(self._clock, entry.start)
            return entry.item
        raise IndexError("pop from an empty FairQueue")

    def remove(self, handle: int) -> bool:
        """Take a waiting item out (its owner gave up). False if it was already popped."""
        entry = self._entries.get(handle)
        if entry is None:
            return False
        entry.removed = True
        self._forget(entry)
        # a user who leaves gives back the virtual time they had claimed, so their next request
        # is not pushed behind a tag they never used
        if self._waiting.get(entry.user, 0) == 0:
            self._last_finish[entry.user] = min(self._last_finish.get(entry.user, 0.0), entry.start)
        return True

    def _forget(self, entry: _Entry[T]) -> None:
        del self._entries[entry.seq]
        left = self._waiting[entry.user] - 1
        if left:
            self._waiting[entry.user] = left
        else:
            del self._waiting[entry.user]
        if not self._entries:
            # idle: forget history so the next burst starts even (no credit or debt carried over)
            self._last_finish.clear()
            self._clock = 0.0

    def waiting_users(self) -> dict[str, int]:
        return dict(self._waiting)


class FairSlots:
    """An engine's concurrency slots, granted to waiting requests in fair order.

    ``async with slots.hold(user, weight):`` waits for a slot; ``async with slots:`` is an
    anonymous holder. Cancellation while waiting leaves nothing behind; a slot granted just as
    its waiter was cancelled is passed on.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.in_use = 0
        self._queue: FairQueue[asyncio.Future[None]] = FairQueue()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def waiting_users(self) -> dict[str, int]:
        return self._queue.waiting_users()

    async def acquire(self, user: str = ANONYMOUS_FLOW, weight: float = 1.0) -> None:
        if self.in_use < self.capacity and not len(self._queue):
            self.in_use += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        handle = self._queue.push(user, weight, future)
        try:
            await future
        except asyncio.CancelledError:
            if not self._queue.remove(handle) and future.done() and not future.cancelled():
                self.release()  # granted as we were cancelled: hand it on
            raise

    def release(self) -> None:
        while len(self._queue):
            future = self._queue.pop()
            if not future.done():
                future.set_result(None)  # the slot passes straight to the next waiter
                return
        self.in_use -= 1

    @contextlib.asynccontextmanager
    async def hold(self, user: str = ANONYMOUS_FLOW, weight: float = 1.0) -> AsyncIterator[None]:
        await self.acquire(user, weight)
        try:
            yield
        finally:
            self.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

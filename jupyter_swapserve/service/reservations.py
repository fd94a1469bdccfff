"""GPU-memory reservations, one manager per device.

A reservation is granted only while the sum of granted reservations stays within the
device's capacity. Waiters queue by (priority, arrival); the head of the queue is granted
first, and a later, smaller waiter never overtakes it (no starvation). A reservation is
released exactly once, whatever path its owner takes: ``release()`` is idempotent, and a
waiter cancelled after it was granted gives the grant back.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

EPSILON = 1e-9


class ReservationTooLarge(ValueError):
    """The request can never be granted on this device."""


class Reservation:
    """Memory granted to ``owner`` on one device until released."""

    def __init__(self, manager: ReservationManager, owner: str, gib: float) -> None:
        #: the device's manager, which alone changes the books (release, resize, transfer)
        self.manager = manager
        self.owner = owner
        self.gib = gib
        self.released = False

    @property
    def device(self) -> int:
        return self.manager.device

    @property
    def total_gib(self) -> float:
        """Over all its devices (one here; see ReservationGroup)."""
        return self.gib

    def release(self) -> bool:
        """Give the memory back. True the first time, False (and nothing happens) after."""
        if self.released:
            return False
        self.released = True
        self.manager.released(self)
        return True

    def resize(self, gib: float) -> None:
        """Shrink (always allowed) or grow (only into free memory) a granted reservation."""
        if self.released:
            raise RuntimeError("reservation already released")
        self.manager.resized(self, gib)

    def transfer_to(self, other: Reservation, gib: float) -> None:
        """Move ``gib`` from this reservation to another of the same device; the total is unchanged,
        so nothing is freed in between for a waiter to take."""
        if self.released or other.released or other.manager is not self.manager:
            raise RuntimeError("transfer needs two granted reservations of one device")
        if gib < 0 or gib > self.gib + EPSILON:
            raise ValueError(f"cannot transfer {gib:.2f} GiB out of {self.gib:.2f}")
        self.manager.transferred(self, other, gib)

    def __repr__(self) -> str:
        state = "released" if self.released else "granted"
        return f"<Reservation {self.owner} {self.gib:.2f} GiB on {self.device} {state}>"


class ReservationGroup:
    """One reservation per device for an engine spanning several devices, used as one: the same
    size on each device, released (exactly once each) together."""

    def __init__(self, parts: list[Reservation]) -> None:
        self.parts = parts

    @property
    def owner(self) -> str:
        return self.parts[0].owner

    @property
    def gib(self) -> float:
        """Per device."""
        return self.parts[0].gib

    @property
    def device(self) -> int:
        return self.parts[0].device

    @property
    def devices(self) -> list[int]:
        return [r.device for r in self.parts]

    @property
    def total_gib(self) -> float:
        return sum(r.gib for r in self.parts)

    @property
    def released(self) -> bool:
        return all(r.released for r in self.parts)

    def release(self) -> bool:
        return any([r.release() for r in self.parts])  # a list, not a generator: release every part

    def resize(self, gib: float) -> None:
        for r in self.parts:
            r.resize(gib)

    def __repr__(self) -> str:
        return f"<ReservationGroup {self.parts}>"


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    owner: str = field(compare=False)
    gib: float = field(compare=False)
    future: asyncio.Future[Reservation] = field(compare=False)


class ReservationManager:
    def __init__(self, device: int, capacity_gib: float, on_change: Callable[[], None] | None = None) -> None:
        self.device = device
        self.capacity_gib = float(capacity_gib)
        self._granted: list[Reservation] = []
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()
        self._on_change = on_change or (lambda: None)

    # ---- queries ---------------------------------------------------------------------------
    @property
    def granted_gib(self) -> float:
        return sum(r.gib for r in self._granted)

    @property
    def free_gib(self) -> float:
        return max(0.0, self.capacity_gib - self.granted_gib)

    def granted(self) -> list[Reservation]:
        return list(self._granted)

    def waiting(self) -> list[tuple[str, float, int]]:
        """(owner, GiB, priority) of waiters, in grant order."""
        return [(w.owner, w.gib, w.priority) for w in sorted(self._waiters) if not w.future.done()]

    # ---- acquiring -------------------------------------------------------------------------
    def _check_size(self, gib: float) -> None:
        if gib < 0:
            raise ValueError("reservation size must not be negative")
        if gib > self.capacity_gib + EPSILON:
            raise ReservationTooLarge(
                f"{gib:.2f} GiB can never fit on device {self.device} ({self.capacity_gib:.2f} GiB)"
            )

    def _fits(self, gib: float) -> bool:
        return self.granted_gib + gib <= self.capacity_gib + EPSILON

    def _grant(self, owner: str, gib: float) -> Reservation:
        reservation = Reservation(self, owner, gib)
        self._granted.append(reservation)
        self._on_change()
        return reservation

    def try_acquire(self, owner: str, gib: float) -> Reservation | None:
        """Grant at once if it fits and nobody is queued ahead; else None (nothing queued)."""
        self._check_size(gib)
        self._drop_done_waiters()
        if self._waiters or not self._fits(gib):
            return None
        return self._grant(owner, gib)

    async def acquire(self, owner: str, gib: float, priority: int = 0) -> Reservation:
        """Wait in the queue until granted. Cancellation leaves nothing behind."""
        reservation = self.try_acquire(owner, gib)
        if reservation is not None:
            return reservation
        loop = asyncio.get_running_loop()
        waiter = _Waiter(priority, next(self._seq), owner, gib, loop.create_future())
        heapq.heappush(self._waiters, waiter)
        self._on_change()
        try:
            return await asyncio.shield(waiter.future)
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                waiter.future.result().release()  # granted just as we were cancelled
            else:
                waiter.future.cancel()
                self._drop_done_waiters()
                self._grant_waiters()  # a smaller waiter behind us may fit now
            raise

    @asynccontextmanager
    async def reserved(self, owner: str, gib: float, priority: int = 0) -> AsyncIterator[Reservation]:
        """Scoped reservation: released on every exit path."""
        reservation = await self.acquire(owner, gib, priority)
        try:
            yield reservation
        finally:
            reservation.release()

    # ---- internal --------------------------------------------------------------------------
    def _drop_done_waiters(self) -> None:
        if any(w.future.done() for w in self._waiters):
            self._waiters = [w for w in self._waiters if not w.future.done()]
            heapq.heapify(self._waiters)

    def _grant_waiters(self) -> None:
        self._drop_done_waiters()
        while self._waiters and self._fits(self._waiters[0].gib):
            waiter = heapq.heappop(self._waiters)
            waiter.future.set_result(self._grant(waiter.owner, waiter.gib))

    # ---- called by a reservation on itself (the only ways its books change) ---------------------
    def released(self, reservation: Reservation) -> None:
        self._granted.remove(reservation)
        self._on_change()
        self._grant_waiters()

    def transferred(self, source: Reservation, target: Reservation, gib: float) -> None:
        source.gib -= gib
        target.gib += gib
        self._on_change()

    def resized(self, reservation: Reservation, gib: float) -> None:
        self._check_size(gib)
        growth = gib - reservation.gib
        if growth > EPSILON and not self._fits(growth):
            raise ReservationTooLarge(
                f"cannot grow {reservation.owner} to {gib:.2f} GiB: only {self.free_gib:.2f} free")
        reservation.gib = gib
        self._on_change()
        if growth < 0:
            self._grant_waiters()

"""One engine instance: its request accounting, rw-lock and reservations; its states are the
tenants' state machine (:mod:`.states`).

Requests are forwarded only while ``running`` and under the read side of the rw-lock; a swap-out
takes the write side, so it waits for in-flight requests and no new one is forwarded meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ModelConfig
from ..engines.base import EngineAdapter
from .clock import Clock
from .fairness import FairSlots
from .reservations import Reservation, ReservationGroup
from .states import State, Tenant
from .steps import StepTiming


class DrainTimeout(TimeoutError):
    pass


class RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (writer preference)."""

    def __init__(self) -> None:
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._cond = asyncio.Condition()

    @property
    def readers(self) -> int:
        return self._readers

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def write(self, timeout: float | None = None) -> AsyncIterator[None]:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: not self._writer and self._readers == 0), timeout
                )
            except asyncio.TimeoutError:
                raise DrainTimeout(f"{self._readers} request(s) still in flight after {timeout} s") from None
            finally:
                self._writers_waiting -= 1
                self._cond.notify_all()
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class Backend(Tenant):
    config: ModelConfig
    adapter: EngineAdapter
    state: State = State.STOPPED
    runtime: Any = None  # ProcessRuntime or PodmanRuntime while an engine process exists
    base_url: str | None = None
    reservation: Reservation | ReservationGroup | None = None
    #: residual: keep — what a sleeping engine still holds on the GPU, reserved while swapped out
    residual_reservation: Reservation | None = None
    memory_gib: float | None = None
    memory_measured: bool = False
    queued: int = 0
    in_flight: int = 0
    #: the last activity, for the scheduler (idle timeout, least recently used): requests, start-up, swap-ins
    last_used: float = 0.0
    #: when a request was last served (what people mean by "last used"); 0: never
    last_request: float = 0.0
    served_since_swap_in: bool = True
    #: the highest quota priority among waiting requests (kept by SwapService.admit): the policy's tie-breaker
    queued_priority: float = 0.0
    #: time.monotonic() when the engine last came onto the device (its residency quantum counts from here)
    resident_since: float = 0.0
    slept: bool = False  # the engine-aware sleep hook ran on the last swap-out
    #: what the engine held on the GPU right after its last sleep (NVML): the size of its residual,
    #: reserved again when a checkpointed residual is brought back to the GPU
    residual_gib: float = 0.0
    checkpointed_pids: list[int] = field(default_factory=list)
    error: str | None = None
    failures: int = 0
    failed_at: float = 0.0
    swaps_in: int = 0
    swaps_out: int = 0
    last_swap_in_seconds: float | None = None
    last_swap_out_seconds: float | None = None
    last_cold_start_seconds: float | None = None
    last_steps: list[StepTiming] = field(default_factory=list)
    swap_in_history: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=30))
    requests_total: int = 0
    clock: Clock = field(default_factory=Clock, repr=False)

    def __post_init__(self) -> None:
        self.rw = RWLock()
        self.transition = asyncio.Lock()  # one start/swap/stop at a time
        self.slots = FairSlots(self.config.concurrency)  # fair across users (service/fairness.py)
        self.memory_gib = self.config.memory_gib
        self.on_change: Callable[[], None] = lambda: None
        self.watcher: asyncio.Task[None] | None = None
        self.intentional_stop = False

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def devices(self) -> list[int]:
        return self.config.devices

    @property
    def device(self) -> int:
        """The first (for most engines the only) device."""
        return self.config.devices[0]

    def arrived(self) -> None:
        """On the device again (started or swapped in): used now, its residency quantum starts."""
        self.last_used = self.clock.time()
        self.resident_since = self.clock.monotonic()
        self.served_since_swap_in = False

    def swapped_in(self, seconds: float) -> None:
        super().swapped_in(seconds)
        self.slept = False
        self.arrived()

    def release_reservation(self) -> None:
        """Give back what the engine frees by leaving the device (its residual stays, if kept)."""
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None

    def release_all(self) -> None:
        """The engine is gone: give back everything, the kept residual too."""
        self.release_reservation()
        if self.residual_reservation is not None:
            self.residual_reservation.release()
            self.residual_reservation = None

    @property
    def reserved_gib(self) -> float:
        """Reserved on all its devices together."""
        return sum(r.total_gib for r in (self.reservation, self.residual_reservation) if r is not None)

"""Placement: getting a tenant memory on a device, making room by evicting other tenants.

Invariant: the sum of granted reservations on a device never exceeds its capacity (the
:class:`.reservations.ReservationManager` guarantees it), and every reservation handed out here is
either returned to its caller or released, on every path, cancellation included.

Placement knows tenants only through their sources (:class:`TenantSource`: the models, the notebook
kernels, any later kind), their snapshots and the pure policy (:mod:`.policy`). To grant ``gib``:

    1. refuse at once what pinned tenants make impossible;
    2. take free memory; else checkpoint kept residuals, least recently used first (cheapest room);
    3. else evict the policy's victims one by one, each in a task of its own, until granted;
    4. else queue for the memory, planning again when something changes (a request ends) or after a while.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

from .background import Background
from .events import Notifier
from .policy import BackendSnapshot, ResidualSnapshot, choose_victims, movable_residuals
from .reservations import Reservation, ReservationGroup, ReservationManager

#: a request gives up on its memory after its victims' swap-outs failed this many times each
MAX_REFUSED_EVICTIONS = 3


class EngineUnavailable(RuntimeError):
    """The engine cannot serve now (failed start, died, swap failed, no room). Maps to 503."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TenantSource(Protocol):
    """A kind of tenant of the devices (models, notebook kernels), seen by placement only as
    snapshots for the policy, victims it can evict and residuals it can move to the host."""

    def owns(self, name: str) -> bool: ...
    def label(self, name: str) -> str: ...
    def snapshots(self) -> list[BackendSnapshot]: ...
    async def evict(self, name: str, reason: str) -> bool: ...
    def holds(self, name: str) -> bool: ...
    def error(self, name: str) -> str | None: ...
    def pinned_gib(self, device: int, requester: str) -> float: ...
    def residuals(self, device: int) -> list[ResidualSnapshot]: ...
    async def checkpoint_residual(self, name: str) -> None: ...


class Placement:
    def __init__(self, managers: dict[int, ReservationManager], notifier: Notifier, background: Background) -> None:
        #: one reservation manager per device index
        self.managers = managers
        self.notifier = notifier
        self.background = background
        self.device_locks = {index: asyncio.Lock() for index in managers}
        self.sources: list[TenantSource] = []

    def register(self, source: TenantSource) -> None:
        self.sources.append(source)

    def snapshots(self) -> list[BackendSnapshot]:
        return [s for source in self.sources for s in source.snapshots()]

    def label(self, name: str) -> str:
        """How error messages name a tenant ("model 'x'", "kernel 1234")."""
        source = next((s for s in self.sources if s.owns(name)), None)
        return source.label(name) if source is not None else name

    def source_of(self, name: str) -> TenantSource:
        source = next((s for s in self.sources if s.owns(name)), None)
        if source is None:
            raise KeyError(f"no tenant source owns {name!r}")
        return source

    # ---- reserving -------------------------------------------------------------------------
    async def reserve(self, name: str, devices: list[int], gib: float) -> Reservation | ReservationGroup:
        """``gib`` on each of ``devices`` for the tenant ``name``, evicting victims chosen by the policy.

        Devices are taken in index order by every tenant, so two engines that span the same
        devices cannot each hold one and wait for the other (no circular wait)."""
        parts: list[Reservation] = []
        try:
            for device in devices:
                parts.append(await self.reserve_on(name, device, gib))
        except BaseException:
            for part in parts:
                part.release()
            raise
        return parts[0] if len(parts) == 1 else ReservationGroup(parts)

    async def reserve_on(self, name: str, device: int, gib: float) -> Reservation:
        """``gib`` on one device for the tenant ``name`` (a model or a kernel), evicting victims."""
        manager = self.managers[device]
        refused: dict[str, int] = {}  # victims whose swap-out failed, and how often
        while True:
            self._refuse_if_pinned_out(name, device, gib)
            async with self.device_locks[device]:
                reservation = manager.try_acquire(name, gib) or await self._checkpoint_residuals(name, device, gib)
                if reservation is None:
                    reservation = await self._evict(name, device, gib, refused)
                if reservation is not None:
                    return reservation
            # nothing (enough) evictable now: queue for the memory, re-plan when things change
            reservation = await self.wait_for_memory_or_victim(manager, name, gib)
            if reservation is not None:
                return reservation

    def _refuse_if_pinned_out(self, name: str, device: int, gib: float) -> None:
        """Pinned tenants and residuals kept by `residual: keep` never leave: if they leave too little,
        waiting cannot help (residuals kept by `residual: auto` are checkpointed to make room)."""
        capacity = self.managers[device].capacity_gib
        pinned = sum(source.pinned_gib(device, name) for source in self.sources)
        if gib > capacity - pinned + 1e-9:
            raise EngineUnavailable(
                f"{self.label(name)} needs {gib:.2f} GiB but pinned models hold {pinned:.2f} of "
                f"{capacity:.2f} GiB on device {device}", retry_after=60)

    async def _checkpoint_residuals(self, name: str, device: int, gib: float) -> Reservation | None:
        """Cheapest room first: the residuals of sleeping engines, least recently used first."""
        manager = self.managers[device]
        kept = [r for source in self.sources for r in source.residuals(device)]
        for kept_by in movable_residuals(kept, gib - manager.free_gib):  # names, least recently used first
            await self.source_of(kept_by).checkpoint_residual(kept_by)
            reservation = manager.try_acquire(name, gib)
            if reservation is not None:
                return reservation
        return None

    async def _evict(self, name: str, device: int, gib: float, refused: dict[str, int]) -> Reservation | None:
        """Evict the policy's victims one by one until the memory is granted. Gives up (503) when the
        only victims keep refusing to leave."""
        manager = self.managers[device]
        plan = choose_victims(self.snapshots(), device, gib, manager.free_gib, name)
        if plan.sufficient:
            for victim in plan.victims:
                source = self.source_of(victim)
                reservation = await self.evict_until_granted(
                    lambda reason, v=victim, s=source: s.evict(v, reason), name, manager, gib)
                if reservation is not None:
                    return reservation
                if source.holds(victim):  # its swap-out was abandoned
                    refused[victim] = refused.get(victim, 0) + 1
        if plan.victims and all(refused.get(v, 0) >= MAX_REFUSED_EVICTIONS for v in plan.victims):
            # the only way to make room keeps failing: say so instead of waiting forever
            reasons = "; ".join(f"{v}: {self.source_of(v).error(v) or 'swap-out failed'}" for v in plan.victims)
            raise EngineUnavailable(
                f"{self.label(name)} needs {gib:.2f} GiB on device {device}, but the tenants "
                f"holding it could not be swapped out ({reasons})", retry_after=30)
        return None

    async def wait_for_memory_or_victim(self, manager: ReservationManager, name: str, gib: float,
                                        replan_s: float = 1.0) -> Reservation | None:
        """Queue for the memory. The reservation once granted; None as soon as the policy has a victim
        again (a protected tenant's work ended: every request's end notifies) or after ``replan_s``,
        for the caller to plan again. The place in the queue is kept across notifications."""
        acquire = asyncio.ensure_future(manager.acquire(name, gib))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + replan_s
        try:
            while not acquire.done() and (remaining := deadline - loop.time()) > 0:
                changed = asyncio.ensure_future(self.notifier.wait(timeout=remaining))
                try:
                    await asyncio.wait({acquire, changed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if acquire.done():
                    break
                plan = choose_victims(self.snapshots(), manager.device, gib, manager.free_gib, name)
                if plan.sufficient and plan.victims:
                    break
        except BaseException:
            reservation = _granted(acquire)
            if reservation is not None:
                reservation.release()  # granted as the request went away: nothing leaks
            raise
        finally:
            if not acquire.done():
                acquire.cancel()  # a grant racing the cancellation is given back by acquire() itself
                await asyncio.gather(acquire, return_exceptions=True)
        return _granted(acquire)

    async def evict_until_granted(self, evict: Callable[[str], Awaitable[bool]], requester: str,
                                  manager: ReservationManager, gib: float) -> Reservation | None:
        """Swap a victim out in a task of its own (the requester's cancellation must not cut it short,
        or the victim would be left half swapped) and return the requester's reservation as soon as
        the memory is there: a victim with a sleep hook gives its weights and KV cache back when the
        hook returns, so the requester's swap-in runs while the victim's residual is still being
        checkpointed and frozen. None when the swap-out ended without enough memory for the request."""
        # queue for the memory first: the victim then sees someone waiting (residual: auto checkpoints
        # its residual instead of keeping it), and every byte it frees goes to this request
        granted = asyncio.ensure_future(manager.acquire(requester, gib))
        await asyncio.sleep(0)
        task = self.background.spawn(evict(f"preempted for {requester}"))
        taken = False
        try:
            await asyncio.wait({task, granted}, return_when=asyncio.FIRST_COMPLETED)
            if not granted.done():
                await asyncio.sleep(0)  # a grant made by the swap-out's last release lands here
            reservation = _granted(granted)
            taken = reservation is not None
            return reservation
        finally:
            if not taken:
                granted.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    (await granted).release()  # granted just as we gave up: give it back


def _granted(acquire: asyncio.Future[Reservation]) -> Reservation | None:
    if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
        return acquire.result()
    return None

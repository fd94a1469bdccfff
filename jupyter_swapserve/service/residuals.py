"""Residuals: what a sleeping engine still holds on the GPU after its sleep hook (CUDA context,
allocator pools, ~1 GiB), and the memory handed over while that hook runs.

Invariant: a residual on the GPU is always booked — in the running reservation while the engine
sleeps, in ``residual_reservation`` once it is swapped out with the residual kept — and a
checkpointed one never is. Each operation lists its steps, undone in reverse on failure:

    sleep (handing over):  sleep hook, reservation following what NVML shows   (undo: regrow → wake)
    release weights:       shrink the reservation to the residual              (undo: regrow)
    keep:                  the reservation shrinks to the residual and stays   (no driver call)
    checkpoint residual:   thaw → lock → checkpoint → freeze, then release     (to make room)
    restore residual:      book → thaw → restore → unlock → freeze             (room to keep it again)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .backend import Backend
from .handover import run_handing_over
from .placement import Placement
from .policy import ResidualSnapshot, keeps_residual, residuals_to_restore
from .states import State
from .steps import DriverSteps, SwapRecord, SwapStepError, SwapSteps

log = logging.getLogger(__name__)


class Residuals:
    def __init__(self, backends: dict[str, Backend], placement: Placement, monitor: Any, driver: DriverSteps,
                 record: SwapRecord, client: Any, fail: Callable[[Backend, str], Awaitable[None]],
                 is_virtual: Callable[[Backend], bool]) -> None:
        self.backends = backends
        self.placement = placement
        self.monitor = monitor
        self.driver = driver
        self.record = record
        self.client = client  # the HTTP client of the engines' sleep and wake hooks
        self.fail = fail
        self.is_virtual = is_virtual

    def kept(self, device: int) -> list[ResidualSnapshot]:
        """Residuals kept on ``device`` by swapped-out engines."""
        return [ResidualSnapshot(b.name, b.residual_reservation.gib, b.last_used, b.config.residual)
                for b in self.backends.values()
                if device in b.devices and b.residual_reservation is not None and b.state == State.SWAPPED_OUT]

    # ---- on swap-out: the sleep, handing memory over, and what stays ---------------------------
    async def sleep(self, steps: SwapSteps, backend: Backend) -> tuple[bool, float]:
        """The sleep hook as a swap step, then the decision on the residual (measured after the
        sleep, once: an NVML query). Returns (keep it on the GPU, its GiB)."""
        full = backend.reservation.gib if backend.reservation is not None else 0.0
        # overlapped eviction, first half: what the hook frees is handed over while it runs
        await steps.run("sleep", lambda: self._sleep_handing_over(backend),
                        undo=lambda: self._regrow_and_wake(backend, full), undo_if_failed=True)
        residual = self._residual_gib(backend)
        backend.residual_gib = residual
        keep = keeps_residual(backend.config.residual,
                              not self.driver.available or self._room_for_residual(backend, residual))
        if not keep and backend.reservation is not None:
            # overlapped eviction: the weights and KV cache left with the sleep hook; hand the rest
            # over now, while the residual is checkpointed (undo: take it back)
            await steps.run("release weights", lambda: self._shrink_to(backend, residual),
                            undo=lambda: self._regrow(backend, full))
        return keep, residual

    def _residual_gib(self, backend: Backend) -> float:
        per_device = self.monitor.process_memory_gib(backend.runtime.pids())
        return max((per_device.get(d, 0.0) for d in backend.devices), default=0.0)

    def _room_for_residual(self, backend: Backend, residual: float) -> bool:
        """residual: auto keeps the residual while the memory the sleep freed still covers everyone
        waiting for memory on its devices (a kept residual costs ~1 GiB; a restore of it ~0.75 s)."""
        held = backend.reservation.gib if backend.reservation is not None else 0.0
        for d in backend.devices:
            manager = self.placement.managers[d]
            wanted = sum(gib for _, gib, _ in manager.waiting())
            if manager.free_gib + max(0.0, held - residual) + 1e-9 < wanted:
                return False
        return True

    async def _sleep_handing_over(self, backend: Backend) -> None:
        """The engine's sleep hook; while it runs, its reservation follows what its processes still
        hold (service/handover.py), so a waiting engine's wake overlaps this one's copy out."""
        async def sleep() -> Any:
            return await backend.adapter.sleep(self.client, backend.base_url or "")

        reservation = backend.reservation
        if reservation is None:
            await sleep()
            return
        pids = backend.runtime.pids()
        devices = list(backend.devices)

        def held_gib() -> float | None:
            try:
                per_device = self.monitor.process_memory_gib(pids)
            except Exception:  # NVML busy or gone: no sample, nothing handed over this time
                return None
            if not all(d in per_device for d in devices):
                return None  # not listed is not "holds nothing": an engine always holds its context
            return max(per_device[d] for d in devices)

        _, report = await run_handing_over(sleep, held_gib, reservation)
        log.info("%s: %s", backend.name, report.describe())

    async def _regrow_and_wake(self, backend: Backend, gib: float) -> None:
        """Undo of the sleep: take back what was handed over (fails when another engine holds it, and
        the engine is then stopped), then wake the engine."""
        await self._regrow(backend, gib)
        await backend.adapter.wake(self.client, backend.base_url or "")

    async def _shrink_to(self, backend: Backend, residual: float) -> None:
        if backend.reservation is not None:
            backend.reservation.resize(min(residual, backend.reservation.gib))

    async def _regrow(self, backend: Backend, gib: float) -> None:
        """Undo of the early release: possible only while nobody took the memory; otherwise the engine
        cannot wake, the unwind fails, and the engine is stopped (and restarted on demand)."""
        if backend.reservation is not None and backend.reservation.gib < gib:
            backend.reservation.resize(gib)

    def keep(self, backend: Backend, residual: float) -> None:
        """After a sleep without checkpoint: the GPU memory the engine still holds (``residual``,
        measured by NVML after the sleep) stays reserved while it is swapped out; the rest of its
        reservation is freed."""
        kept = backend.residual_reservation
        if kept is not None:
            grow = residual - kept.gib
            if grow > 0 and backend.reservation is not None:
                backend.reservation.transfer_to(kept, min(grow, backend.reservation.gib))
            elif grow < 0:
                kept.resize(residual)
        elif backend.reservation is not None:
            # the running reservation shrinks to the residual and is kept; nothing is freed twice
            backend.reservation.resize(min(residual, backend.reservation.gib))
            backend.residual_reservation, backend.reservation = backend.reservation, None
        log.info("%s keeps %.2f GiB on the GPU while swapped out", backend.name, residual)

    # ---- moving a kept residual to the host and back ---------------------------------------------
    async def checkpoint(self, backend: Backend) -> None:
        """Move a sleeping engine's kept residual to host memory (thaw → lock → checkpoint → freeze:
        the driver cannot work on a frozen process) and give its reservation back. Called with the
        device lock held: an engine whose transition lock is taken (a request is about to swap it in,
        and will wait for the device lock) is skipped, never waited for, or the two would deadlock."""
        if backend.transition.locked():
            return
        async with backend.transition:
            if backend.state != State.SWAPPED_OUT or backend.residual_reservation is None:
                return
            steps = SwapSteps()
            runtime = backend.runtime
            pids: list[int] = []
            try:
                await steps.run("thaw", runtime.thaw, undo=runtime.freeze)
                pids = self.monitor.gpu_pids(runtime.pids())
                await self.driver.checkpoint(steps, pids)
                await steps.run("freeze", runtime.freeze, undo=runtime.thaw, undo_if_failed=True)
            except BaseException as exc:  # a failed step (SwapStepError) or a cancellation, both unwound
                self.record.swap(backend, "residual checkpoint failed", steps)
                if not steps.unwound:
                    await self.fail(backend, f"checkpoint of its kept residual failed and could not be undone: {exc}")
                if isinstance(exc, SwapStepError):
                    return
                raise
            backend.checkpointed_pids = pids
            backend.residual_reservation.release()
            backend.residual_reservation = None
            self.record.swap(backend, "residual checkpointed to make room", steps)

    async def restore_all(self) -> None:
        """Bring checkpointed `residual: auto` residuals back to the GPU while there is room (the
        policy says which), so the next swap-in is thaw → wake. Engines in a transition are left alone."""
        if not self.driver.available:
            return
        for device, manager in self.placement.managers.items():
            moving = {State.STARTING, State.SWAPPING_IN, State.SWAPPING_OUT}
            busy = any(device in b.devices and (b.state in moving or b.transition.locked())
                       for b in self.backends.values())
            lock = self.placement.device_locks[device]
            if busy or lock.locked():
                continue  # someone is making room or moving in or out: memory is not idle on this device
            candidates = {
                b.name: b for b in self.backends.values()
                if b.devices == [device] and b.state == State.SWAPPED_OUT and b.slept and b.checkpointed_pids
                and b.residual_reservation is None and b.config.residual == "auto" and b.residual_gib > 0
                and not b.transition.locked() and not self.is_virtual(b)}
            snapshots = [ResidualSnapshot(b.name, b.residual_gib, b.last_used, b.config.residual)
                         for b in candidates.values()]
            # under the device lock: no reservation (and no residual checkpoint to make room) runs meanwhile
            async with lock:
                for name in residuals_to_restore(snapshots, manager.free_gib, bool(manager.waiting())):
                    await self._restore(candidates[name])

    async def _restore(self, backend: Backend) -> None:
        """thaw → restore → unlock → freeze: the sleeping engine's residual is on the GPU again (as if
        kept), its reservation taken first; every step undone in reverse if one fails."""
        if backend.transition.locked():
            return
        async with backend.transition:
            if backend.state != State.SWAPPED_OUT or not backend.checkpointed_pids:
                return
            reservation = self.placement.managers[backend.device].try_acquire(backend.name, backend.residual_gib)
            if reservation is None:
                return  # taken meanwhile
            backend.residual_reservation = reservation  # booked before the memory is on the GPU
            steps = SwapSteps()
            runtime, pids = backend.runtime, list(backend.checkpointed_pids)
            try:
                await steps.run("thaw", runtime.thaw, undo=runtime.freeze)
                await self.driver.restore(steps, pids)
                await steps.run("freeze", runtime.freeze, undo=runtime.thaw, undo_if_failed=True)
            except BaseException as exc:  # a failed step (SwapStepError) or a cancellation, both unwound
                self.record.swap(backend, "residual restore failed", steps)
                if steps.unwound:  # back on the host: the booking goes
                    reservation.release()
                    backend.residual_reservation = None
                else:  # fail() gives back everything
                    await self.fail(backend, f"restore of its residual failed and could not be undone: {exc}")
                if isinstance(exc, SwapStepError):
                    return
                raise
            backend.checkpointed_pids = []
            self.record.swap(backend, "swap-in of the residual (room to keep it)", steps)
            backend.on_change()

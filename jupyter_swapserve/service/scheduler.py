"""The sequencer of a model's life: cold start (with the startup snapshot), swap-in, swap-out,
idle swap-out, restarts of failed engines with backoff.

It decides nothing itself and touches no process: the memory comes from :mod:`.placement`
(which asks the policy for victims), residuals are :mod:`.residuals`, the driver's steps and the
record of each swap :mod:`.steps`, the engine's process :mod:`.launcher`. Each sequence below lists
its steps; every step is undone in reverse when a later one fails (:class:`.steps.SwapSteps`), and
what the sequence holds is given back on every way out (failure and cancellation alike).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ..engines.base import EngineError
from ..runtime.process import RuntimeStepError
from .backend import Backend, DrainTimeout
from .background import Background
from .clock import Clock
from .launcher import EngineLauncher
from .placement import EngineUnavailable, Placement
from .policy import BackendSnapshot, ResidualSnapshot, prefetch_victims, residency_quantum
from .reservations import ReservationTooLarge
from .residuals import Residuals
from .states import State
from .steps import DriverSteps, SwapRecord, SwapStepError, SwapSteps

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0


class Scheduler:
    def __init__(self, backends: dict[str, Backend], placement: Placement, residuals: Residuals,
                 launcher: EngineLauncher, driver: DriverSteps, record: SwapRecord, background: Background,
                 monitor: Any, clock: Clock) -> None:
        self.backends = backends
        self.placement = placement
        self.residuals = residuals
        self.launcher = launcher
        self.driver = driver
        self.record = record
        self.background = background
        self.monitor = monitor
        self.clock = clock

    # ---- the public operations -------------------------------------------------------------
    async def ensure_running(self, backend: Backend) -> float:
        """Make the engine serve; returns the seconds this caller waited for it."""
        if backend.state == State.RUNNING:
            return 0.0  # the common case: no swap, no wait
        t0 = time.perf_counter()
        while backend.state != State.RUNNING:
            async with backend.transition:
                if backend.state == State.RUNNING:
                    break
                if backend.state == State.SWAPPED_OUT:
                    await self.swap_in(backend)
                elif backend.state in (State.STOPPED, State.FAILED):
                    await self._wait_backoff(backend)
                    await self.cold_start(backend, snapshot=False)
        return time.perf_counter() - t0

    def prefetch(self, backend: Backend) -> str:
        """An intent hint: swap the engine in ahead of need if that evicts nothing busy. Returns what
        happens: 'running', 'starting' (a swap-in began in the background) or why it was declined."""
        if backend.state == State.RUNNING:
            return "running"
        if backend.state in (State.SWAPPING_IN, State.STARTING):
            return "starting"
        if backend.state not in (State.SWAPPED_OUT, State.STOPPED):
            return f"declined: the model is {backend.state.value}"
        kept = backend.residual_reservation.gib if backend.residual_reservation else 0.0
        if backend.memory_gib is None:
            return "declined: its size is not measured yet"
        need = max(0.0, float(backend.memory_gib) - kept)
        # a hint never pushes a user's idle kernel out: only idle models make room for it
        models = self.placement.source_of(backend.name).snapshots()
        for device in backend.devices:
            free = self.placement.managers[device].free_gib
            if not prefetch_victims(models, device, need, free, backend.name).sufficient:
                return "declined: no free memory without evicting a busy model"
        self.background.spawn(self._prefetch(backend))
        return "starting"

    async def _prefetch(self, backend: Backend) -> None:
        with contextlib.suppress(EngineUnavailable):
            await self.ensure_running(backend)

    async def _wait_backoff(self, backend: Backend) -> None:
        if backend.failures == 0:
            return
        delay = min(MAX_BACKOFF, 2.0 ** (backend.failures - 1)) - (self.clock.monotonic() - backend.failed_at)
        if delay > 0:
            await asyncio.sleep(delay)

    async def cold_start(self, backend: Backend, snapshot: bool) -> None:
        """reserve → start the process → wait until it answers → warm up → (measure); then, for the
        startup snapshot, swap it out at once (unless pinned) so later requests find it one swap-in
        away. An unknown size holds the whole device while starting, shrunk to the measured size."""
        t0 = time.perf_counter()
        backend.set_state(State.STARTING)
        capacity = min(self.placement.managers[d].capacity_gib for d in backend.devices)
        measure = backend.memory_gib is None
        try:
            backend.reservation = await self.placement.reserve(
                backend.name, backend.devices, capacity if measure else float(backend.memory_gib or 0))
            await self.launcher.start(backend, measure)
        except (EngineError, RuntimeStepError, ReservationTooLarge, EngineUnavailable, OSError) as exc:
            await self.launcher.fail(backend, f"start failed: {exc}")
            raise EngineUnavailable(f"model '{backend.name}' could not start: {exc}") from None
        except BaseException:
            await self.launcher.fail(backend, "start cancelled")
            raise
        if backend.state != State.STARTING:  # it exited right after it answered: its watcher failed it
            raise EngineUnavailable(f"model '{backend.name}' could not start: {backend.error}")
        backend.last_cold_start_seconds = time.perf_counter() - t0
        backend.failures = 0
        backend.arrived()
        backend.set_state(State.RUNNING)
        log.info("%s started in %.2f s", backend.name, backend.last_cold_start_seconds)
        if snapshot and not backend.config.pinned:
            with contextlib.suppress(SwapStepError, DrainTimeout):
                await self._swap_out_locked(backend, reason="startup snapshot")

    async def swap_in(self, backend: Backend) -> None:
        """swapped_out → running: reserve (evicting) → thaw → restore → unlock → wake."""
        assert backend.transition.locked()
        t0 = time.perf_counter()
        backend.set_state(State.SWAPPING_IN)
        kept = backend.residual_reservation.gib if backend.residual_reservation else 0.0
        try:
            backend.reservation = await self.placement.reserve(
                backend.name, backend.devices, max(0.0, float(backend.memory_gib or 0) - kept))
        except BaseException:
            if backend.state == State.SWAPPING_IN:  # not if the engine died meanwhile (failed)
                backend.set_state(State.SWAPPED_OUT)
            raise
        if backend.state != State.SWAPPING_IN or backend.runtime is None:
            # the engine exited while this swap-in waited for memory (its watcher failed it)
            backend.release_reservation()
            raise EngineUnavailable(f"model '{backend.name}' exited while it was being swapped in: {backend.error}")
        steps = SwapSteps()
        try:
            await self._swap_in_steps(steps, backend)
        except BaseException as exc:  # a failed step (SwapStepError) or a cancellation, both unwound
            await self._swap_in_unwound(backend, steps, exc)
            if isinstance(exc, SwapStepError):
                raise EngineUnavailable(f"model '{backend.name}' could not be swapped in: {exc}") from None
            raise
        backend.swapped_in(time.perf_counter() - t0)
        self.record.swap(backend, "swap-in", steps)
        backend.set_state(State.RUNNING)

    async def _swap_in_steps(self, steps: SwapSteps, backend: Backend) -> None:
        runtime = backend.runtime
        await steps.run("thaw", runtime.thaw, undo=runtime.freeze)
        await self.driver.restore(steps, list(backend.checkpointed_pids))
        if backend.slept:
            client, url = self.launcher.client, backend.base_url or ""
            await steps.run("wake", lambda: backend.adapter.wake(client, url),
                            undo=lambda: backend.adapter.sleep(client, url))

    async def _swap_in_unwound(self, backend: Backend, steps: SwapSteps, exc: BaseException) -> None:
        """After a swap-in that did not complete: its memory goes back; the engine is swapped out as
        before when every step was undone, and stopped (failed) when not."""
        self.record.swap(backend, "swap-in failed", steps)
        backend.release_reservation()
        if backend.state != State.SWAPPING_IN:
            return  # it died meanwhile: already failed, everything given back
        if steps.unwound and backend.runtime is not None and backend.runtime.running:
            backend.set_state(State.SWAPPED_OUT)
            if isinstance(exc, SwapStepError):
                backend.error = f"swap-in failed at {exc.step}: {exc.cause}"
        else:
            await self.launcher.fail(backend, f"swap-in failed and could not be undone: {exc}")

    async def swap_out(self, backend: Backend, reason: str) -> bool:
        """running → swapped_out. False when it was not running or could not drain in time."""
        async with backend.transition:
            if backend.state != State.RUNNING:
                return False
            try:
                await self._swap_out_locked(backend, reason)
            except (SwapStepError, DrainTimeout) as exc:
                log.warning("swap-out of %s abandoned: %s", backend.name, exc)
                return False
            return True

    async def _swap_out_locked(self, backend: Backend, reason: str) -> None:
        """drain → sleep → (release weights) → lock → checkpoint → freeze; the residual kept instead of
        checkpointed when the option and the room say so."""
        t0 = time.perf_counter()
        backend.set_state(State.SWAPPING_OUT)
        steps = SwapSteps()
        try:
            async with backend.rw.write(timeout=backend.config.drain_timeout):
                keep, residual, pids = await self._swap_out_steps(steps, backend)
        except BaseException as exc:  # a failed step, a drain timeout or a cancellation: all unwound
            await self._swap_out_unwound(backend, steps, exc, reason)
            raise
        if backend.state != State.SWAPPING_OUT:
            return  # the engine died during its swap-out: already failed, everything given back
        backend.slept = any(t.step == "sleep" for t in steps.timings)
        if keep:
            self.residuals.keep(backend, residual)
        backend.release_reservation()
        backend.swapped_out(time.perf_counter() - t0, pids)
        self.record.swap(backend, f"swap-out ({reason})", steps)
        backend.set_state(State.SWAPPED_OUT)

    async def _swap_out_steps(self, steps: SwapSteps, backend: Backend) -> tuple[bool, float, list[int]]:
        """The steps of a swap-out, once drained. Returns (residual kept, its GiB, checkpointed pids)."""
        runtime = backend.runtime
        real_gpu = not self.monitor.all_virtual(backend.devices)
        sleeps = real_gpu and backend.adapter.supports_sleep
        if real_gpu and not self.driver.available and not (sleeps and backend.config.residual in ("keep", "auto")):
            # freezing alone would hand back a reservation whose memory stays on the GPU
            raise SwapStepError("checkpoint", RuntimeError(
                "this driver has no CUDA checkpoint API, so the engine's GPU memory cannot be freed"), unwound=True)
        keep, residual = await self.residuals.sleep(steps, backend) if sleeps else (False, 0.0)
        # residual: keep — what the sleeping engine still holds stays on the GPU, unmoved
        pids = self.monitor.gpu_pids(runtime.pids()) if real_gpu and not keep else []
        await self.driver.checkpoint(steps, pids)
        await steps.run("freeze", runtime.freeze, undo=runtime.thaw, undo_if_failed=True)
        return keep, residual, pids

    async def _swap_out_unwound(self, backend: Backend, steps: SwapSteps, exc: BaseException, reason: str) -> None:
        """After a swap-out that did not complete: the engine serves again as it was when every step
        was undone (a cancellation while draining undid nothing), and is stopped (failed) when not."""
        cancelled = not isinstance(exc, (SwapStepError, DrainTimeout))
        self.record.swap(backend, "swap-out cancelled" if cancelled else "swap-out failed", steps)
        if backend.state != State.SWAPPING_OUT:
            return  # it died meanwhile: already failed, everything given back
        if (isinstance(exc, SwapStepError) and not exc.unwound) or not steps.unwound:
            await self.launcher.fail(backend, f"swap-out failed and could not be undone: {exc}")
            return
        backend.set_state(State.RUNNING)
        if not cancelled:
            backend.error = f"swap-out ({reason}) abandoned: {exc}"

    async def swap_out_idle(self) -> None:
        now = self.clock.time()
        for b in list(self.backends.values()):
            timeout = b.config.idle_timeout
            if (timeout is not None and not b.config.pinned and b.state == State.RUNNING
                    and b.queued == 0 and b.in_flight == 0 and now - b.last_used >= timeout):
                await self.swap_out(b, reason=f"idle for {timeout:g} s")

    async def close(self) -> None:
        await self.background.close()
        await asyncio.gather(*(self.launcher.stop(b) for b in self.backends.values()), return_exceptions=True)


class ModelTenants:
    """The models as a tenant source of the devices (:class:`.placement.TenantSource`): victims
    ranked by the policy, evicted by a swap-out, their kept residuals movable to the host."""

    def __init__(self, backends: dict[str, Backend], scheduler: Scheduler, residuals: Residuals) -> None:
        self.backends = backends
        self.clock = scheduler.clock
        self.scheduler = scheduler
        self.moves = residuals  # keeps, checkpoints and restores the residuals

    def owns(self, name: str) -> bool:
        return name in self.backends

    def label(self, name: str) -> str:
        return f"model '{name}'"

    def snapshots(self) -> list[BackendSnapshot]:
        """One snapshot per backend and device it uses: an engine spanning two GPUs is a candidate
        victim on each, and evicting it frees memory on both."""
        now = self.clock.monotonic()
        return [
            BackendSnapshot(
                name=b.name, device=device, state=b.state,
                memory_gib=b.reservation.gib if b.reservation else (b.memory_gib or 0.0),  # what a swap-out frees
                queued=b.queued, in_flight=b.in_flight, last_used=b.last_used, pinned=b.config.pinned,
                served_since_swap_in=b.served_since_swap_in, priority=b.queued_priority,
                resident_for=now - b.resident_since if b.resident_since else float("inf"),
                quantum=residency_quantum(b.last_swap_in_seconds, b.last_swap_out_seconds,
                                          b.config.residency_multiple, b.config.residency_quantum),
            )
            for b in self.backends.values() for device in b.devices
        ]

    async def evict(self, name: str, reason: str) -> bool:
        return await self.scheduler.swap_out(self.backends[name], reason)

    def holds(self, name: str) -> bool:
        return self.backends[name].state == State.RUNNING

    def error(self, name: str) -> str | None:
        return self.backends[name].error

    def pinned_gib(self, device: int, requester: str) -> float:
        """What never leaves ``device`` for ``requester``: pinned models, and residuals kept by
        `residual: keep` (those kept by `residual: auto` are checkpointed to make room)."""
        return sum((b.reservation.gib if b.config.pinned and b.reservation else 0.0)
                   + (b.residual_reservation.gib if b.residual_reservation and b.config.residual == "keep" else 0.0)
                   for b in self.backends.values() if device in b.devices and b.name != requester)

    def residuals(self, device: int) -> list[ResidualSnapshot]:
        return self.moves.kept(device)

    async def checkpoint_residual(self, name: str) -> None:
        await self.moves.checkpoint(self.backends[name])

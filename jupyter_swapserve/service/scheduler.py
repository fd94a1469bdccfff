"""Swap orchestration: reserve → evict → swap in; swap out victims and idle engines; cold
starts with the startup snapshot; restarts of failed engines with backoff.

The decisions (which victim) live in :mod:`.policy`; the memory bookkeeping in
:mod:`.reservations`; the steps on a process in the runtime and the checkpointer. This module
only sequences them, times each step and unwinds on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import httpx

from ..engines.base import EngineError, free_port
from ..gpu.checkpoint import CheckpointError, run_guarded
from ..gpu.monitor import GpuMonitor
from ..runtime import make_runtime
from ..runtime.process import RuntimeStepError
from ..runtime.procfs import rss_bytes
from .backend import Backend, DrainTimeout, State, SwapStepError, SwapSteps
from .events import Notifier
from .handover import run_handing_over
from .policy import (
    BackendSnapshot,
    ResidualSnapshot,
    choose_victims,
    keeps_residual,
    movable_residuals,
    prefetch_victims,
    residency_quantum,
    residuals_to_restore,
)
from .reservations import Reservation, ReservationGroup, ReservationManager, ReservationTooLarge

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
#: a request gives up on its memory after its victims' swap-outs failed this many times each
MAX_REFUSED_EVICTIONS = 3


class TenantSource(Protocol):
    """Tenants of the devices other than models (notebook kernels), seen by the scheduler only as
    snapshots for the policy and as victims it can evict."""

    def snapshots(self) -> list[BackendSnapshot]: ...
    def owns(self, name: str) -> bool: ...
    async def evict(self, name: str, reason: str) -> bool: ...
    def holds(self, name: str) -> bool: ...
    def error(self, name: str) -> str | None: ...
    def pinned_gib(self, device: int, requester: str) -> float: ...


class EngineUnavailable(RuntimeError):
    """The engine cannot serve now (failed start, died, swap failed). Maps to 503."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Scheduler:
    def __init__(
        self,
        backends: dict[str, Backend],
        monitor: GpuMonitor,
        checkpointer: Any,
        notifier: Notifier,
        runtime_factory: Callable[[Backend], Any] | None = None,
        lock_timeout_ms: int = 10_000,
        driver_timeout_s: float = 300.0,
    ) -> None:
        self.backends = backends
        self.monitor = monitor
        self.checkpointer = checkpointer
        self.notifier = notifier
        self.lock_timeout_ms = lock_timeout_ms
        # checkpoint copies at ~1.5 GB/s and restore at ~4 GB/s (design.md §2): 80 GB take < 60 s
        self.driver_timeout_s = driver_timeout_s
        self.reservations = {
            d.index: ReservationManager(d.index, d.capacity_gib, on_change=notifier.notify) for d in monitor.devices
        }
        self._device_locks = {d.index: asyncio.Lock() for d in monitor.devices}
        self._background: set[asyncio.Task[Any]] = set()
        self._runtime_factory = runtime_factory or make_runtime
        self.observers: list[Any] = []  # metrics, event log: swap_recorded(...), engine_failed(...)
        #: other tenants of the devices (idle notebook kernels): victims ranked by the same policy
        self.tenant_sources: list[TenantSource] = []
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None))
        for b in backends.values():
            b.on_change = notifier.notify

    # ---- helpers ---------------------------------------------------------------------------
    def is_virtual(self, backend: Backend) -> bool:
        return all(self.monitor.devices[d].virtual for d in backend.devices)

    def snapshots(self, with_tenants: bool = True) -> list[BackendSnapshot]:
        """One snapshot per backend and device it uses: an engine spanning two GPUs is a candidate
        victim on each, and evicting it frees memory on both. Other tenants (kernels) follow."""
        now = time.monotonic()
        tenants = [s for source in self.tenant_sources for s in source.snapshots()] if with_tenants else []
        return tenants + [
            BackendSnapshot(
                name=b.name, device=device, state=b.state.value,
                memory_gib=b.reservation.gib if b.reservation else (b.memory_gib or 0.0),  # what a swap-out frees
                queued=b.queued, in_flight=b.in_flight, last_used=b.last_used, pinned=b.config.pinned,
                served_since_swap_in=b.served_since_swap_in, priority=b.queued_priority,
                resident_for=now - b.resident_since if b.resident_since else float("inf"),
                quantum=residency_quantum(b.last_swap_in_seconds, b.last_swap_out_seconds,
                                          b.config.residency_multiple, b.config.residency_quantum),
            )
            for b in self.backends.values() for device in b.devices
        ]

    def snapshots_of_residuals(self, device: int) -> list[ResidualSnapshot]:
        return [ResidualSnapshot(b.name, b.residual_reservation.gib, b.last_used, b.config.residual)
                for b in self.backends.values()
                if device in b.devices and b.residual_reservation is not None and b.state == State.SWAPPED_OUT]

    async def _driver(self, step: str, call: Callable[..., Any], pid: int, *args: Any) -> None:
        """A checkpoint driver call in a thread, never awaited for longer than it can take: a
        hung call (restore of a frozen process) fails the step instead of the whole service."""
        timeout = self.lock_timeout_ms / 1000 + 30 if step == "lock" else self.driver_timeout_s
        await run_guarded(step, pid, call, pid, *args, timeout=timeout)

    def _record(self, backend: Any, what: str, steps: SwapSteps) -> None:
        """Keep a swap's step timings on the tenant (a Backend or a kernel: any ``.name`` and
        ``.last_steps``), tell the observers (metrics, event log) and log them."""
        backend.last_steps = steps.timings
        for observer in self.observers:
            observer.swap_recorded(backend.name, what, steps.timings)
        log.info("%s %s: %s", backend.name, what,
                 ", ".join(f"{t.step} {t.seconds * 1000:.1f} ms{'' if t.ok else ' FAILED'}" for t in steps.timings))

    # ---- reservation with eviction ---------------------------------------------------------
    async def _reserve(self, backend: Backend, gib: float) -> None:
        """Get ``gib`` on each of the backend's devices, evicting victims chosen by the policy.

        Devices are taken in index order by every backend, so two engines that span the same
        devices cannot each hold one and wait for the other (no circular wait)."""
        parts: list[Reservation] = []
        try:
            for device in backend.devices:
                parts.append(await self.reserve_on(backend.name, device, gib))
        except BaseException:
            for part in parts:
                part.release()
            raise
        backend.reservation = parts[0] if len(parts) == 1 else ReservationGroup(parts)

    def _tenant_source(self, name: str) -> TenantSource | None:
        return next((s for s in self.tenant_sources if s.owns(name)), None)

    def _evictor(self, name: str) -> Callable[[str], Awaitable[bool]]:
        source = self._tenant_source(name)
        if source is not None:
            return lambda reason: source.evict(name, reason)
        return lambda reason: self.swap_out(self.backends[name], reason)

    def _still_holds(self, name: str) -> tuple[bool, str | None]:
        """After an abandoned eviction: is the victim still on the device, and why it stayed."""
        source = self._tenant_source(name)
        if source is not None:
            return source.holds(name), source.error(name)
        b = self.backends[name]
        return b.state == State.RUNNING, b.error

    async def reserve_on(self, name: str, device: int, gib: float) -> Reservation:
        """``gib`` on one device for the tenant ``name`` (a model or a kernel), evicting victims."""
        manager = self.reservations[device]
        lock = self._device_locks[device]
        who = f"model '{name}'" if name in self.backends else name
        refused: dict[str, int] = {}  # victims whose swap-out failed, and how often
        while True:
            # pinned models and residuals kept by `residual: keep` never leave: if they leave too little,
            # waiting cannot help (residuals kept by `residual: auto` are checkpointed to make room)
            pinned = sum((b.reservation.gib if b.config.pinned and b.reservation else 0.0)
                         + (b.residual_reservation.gib if b.residual_reservation and b.config.residual == "keep"
                            else 0.0)
                         for b in self.backends.values() if device in b.devices and b.name != name)
            pinned += sum(source.pinned_gib(device, name) for source in self.tenant_sources)
            if gib > manager.capacity_gib - pinned + 1e-9:
                raise EngineUnavailable(
                    f"{who} needs {gib:.2f} GiB but pinned models hold {pinned:.2f} of "
                    f"{manager.capacity_gib:.2f} GiB on device {device}", retry_after=60)
            async with lock:
                reservation = manager.try_acquire(name, gib)
                if reservation is None:
                    # cheapest room first: the residuals of sleeping engines, least recently used first
                    for kept in movable_residuals(self.snapshots_of_residuals(device), gib - manager.free_gib):
                        await self._checkpoint_residual(self.backends[kept])
                        reservation = manager.try_acquire(name, gib)
                        if reservation is not None:
                            break
                if reservation is None:
                    plan = choose_victims(self.snapshots(), device, gib, manager.free_gib, name)
                    if plan.sufficient:
                        for victim in plan.victims:
                            reservation = await self._evict_until_granted(self._evictor(victim), name, manager, gib)
                            if reservation is not None:
                                break
                            if self._still_holds(victim)[0]:  # its swap-out was abandoned
                                refused[victim] = refused.get(victim, 0) + 1
                    if plan.victims and all(refused.get(v, 0) >= MAX_REFUSED_EVICTIONS for v in plan.victims):
                        # the only way to make room keeps failing: say so instead of waiting forever
                        reasons = "; ".join(f"{v}: {self._still_holds(v)[1] or 'swap-out failed'}"
                                            for v in plan.victims)
                        raise EngineUnavailable(
                            f"{who} needs {gib:.2f} GiB on device {device}, but the tenants "
                            f"holding it could not be swapped out ({reasons})", retry_after=30)
                if reservation is not None:
                    return reservation
            # nothing (enough) evictable now: queue for the memory, re-plan when things change
            reservation = await self._wait_for_memory_or_victim(manager, name, gib)
            if reservation is not None:
                return reservation

    async def _wait_for_memory_or_victim(self, manager: ReservationManager, name: str, gib: float,
                                         replan_s: float = 1.0) -> Reservation | None:
        """Queue for the memory. The reservation once granted; None as soon as the policy has a victim
        again (a protected tenant's work ended: every request's end notifies) or after ``replan_s``,
        for the caller to plan again. The place in the queue is kept across notifications."""
        acquire = asyncio.ensure_future(manager.acquire(name, gib))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + replan_s

        def granted() -> Reservation | None:
            if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
                return acquire.result()
            return None

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
            reservation = granted()
            if reservation is not None:
                reservation.release()  # granted as the request went away: nothing leaks
            raise
        finally:
            if not acquire.done():
                acquire.cancel()  # a grant racing the cancellation is given back by acquire() itself
                await asyncio.gather(acquire, return_exceptions=True)
        return granted()

    async def _evict_until_granted(self, evict: Callable[[str], Awaitable[bool]], requester: str,
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
        task = asyncio.create_task(evict(f"preempted for {requester}"))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        taken = False
        try:
            await asyncio.wait({task, granted}, return_when=asyncio.FIRST_COMPLETED)
            if not granted.done():
                await asyncio.sleep(0)  # a grant made by the swap-out's last release lands here
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                taken = True
                return granted.result()
            return None
        finally:
            if not taken:
                granted.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    (await granted).release()  # granted just as we gave up: give it back

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
        need = max(0.0, float(backend.memory_gib or 0) - kept) if backend.memory_gib is not None else None
        for device in backend.devices:
            manager = self.reservations[device]
            if need is None:
                return "declined: its size is not measured yet"
            # a hint never pushes a user's idle kernel out: only idle models make room for it
            plan = prefetch_victims(self.snapshots(with_tenants=False), device, need, manager.free_gib,
                                    backend.name)
            if not plan.sufficient:
                return "declined: no free memory without evicting a busy model"
        task = asyncio.create_task(self._prefetch(backend))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return "starting"

    async def _prefetch(self, backend: Backend) -> None:
        with contextlib.suppress(EngineUnavailable):
            await self.ensure_running(backend)

    async def _wait_backoff(self, backend: Backend) -> None:
        if backend.failures == 0:
            return
        delay = min(MAX_BACKOFF, 2.0 ** (backend.failures - 1)) - (time.monotonic() - backend.failed_at)
        if delay > 0:
            await asyncio.sleep(delay)

    async def cold_start(self, backend: Backend, snapshot: bool) -> None:
        """Start the engine, wait until it answers, warm it up; then, for the startup snapshot,
        swap it out at once (unless pinned) so later requests find it one swap-in away."""
        t0 = time.perf_counter()
        backend.set_state(State.STARTING)
        capacity = min(self.reservations[d].capacity_gib for d in backend.devices)
        measure = backend.memory_gib is None
        try:
            # unknown size: hold the whole device while starting, shrink to the measured size after
            await self._reserve(backend, capacity if measure else float(backend.memory_gib or 0))
            port = backend.config.port or free_port()
            spec = backend.adapter.launch_spec(port)
            runtime = self._runtime_factory(backend)
            await runtime.start(spec)
            backend.runtime = runtime
            backend.base_url = spec.base_url
            backend.intentional_stop = False
            backend.watcher = asyncio.create_task(self._watch(backend, runtime))
            await self._wait_ready(backend)
            if backend.config.warmup:
                await self._warmup(backend)
            if measure:
                self._measure(backend)
        except (EngineError, RuntimeStepError, ReservationTooLarge, EngineUnavailable, OSError) as exc:
            await self._fail(backend, f"start failed: {exc}")
            raise EngineUnavailable(f"model '{backend.name}' could not start: {exc}") from None
        except BaseException:
            await self._fail(backend, "start cancelled")
            raise
        backend.last_cold_start_seconds = time.perf_counter() - t0
        backend.failures = 0
        backend.last_used = time.time()
        backend.resident_since = time.monotonic()
        backend.served_since_swap_in = False
        backend.set_state(State.RUNNING)
        log.info("%s started in %.2f s", backend.name, backend.last_cold_start_seconds)
        if snapshot and not backend.config.pinned:
            with contextlib.suppress(SwapStepError, DrainTimeout):
                await self._swap_out_locked(backend, reason="startup snapshot")

    async def _wait_ready(self, backend: Backend) -> None:
        deadline = time.monotonic() + backend.config.start_timeout
        while time.monotonic() < deadline:
            if not backend.runtime.running:
                raise EngineUnavailable(f"engine exited during start: {self._last_log_line(backend)}")
            if await backend.adapter.is_ready(self.client, backend.base_url or ""):
                return
            await asyncio.sleep(0.2)
        raise EngineUnavailable(f"engine not ready after {backend.config.start_timeout:.0f} s")

    async def _warmup(self, backend: Backend) -> None:
        path, body = backend.adapter.warmup_request()
        try:
            r = await self.client.post(f"{backend.base_url}{path}", json=body, timeout=backend.config.start_timeout)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"warm-up request failed: {exc}") from None
        if r.status_code >= 400:
            raise EngineUnavailable(f"warm-up request got HTTP {r.status_code}: {r.text[:200]}")

    def _measure(self, backend: Backend) -> None:
        pids = backend.runtime.pids()
        if self.is_virtual(backend):
            size = rss_bytes(pids) / 1024**3  # resident host memory: the measure on a virtual device
        else:
            # an engine spanning devices reserves the same on each: its largest share
            per_device = self.monitor.process_memory_gib(pids)
            size = max((per_device.get(d, 0.0) for d in backend.devices), default=0.0)
        size = max(size, 0.01)
        backend.memory_gib = round(size, 3)
        backend.memory_measured = True
        if backend.reservation is not None:
            backend.reservation.resize(backend.memory_gib)
        log.info("%s measured at %.3f GiB", backend.name, size)

    @staticmethod
    def _last_log_line(backend: Backend) -> str:
        tail = backend.runtime.log_tail(30) if backend.runtime else ""
        lines = [ln for ln in tail.splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "no output"

    async def swap_in(self, backend: Backend) -> None:
        """swapped_out → running: reserve (evicting) → thaw → restore → unlock → wake."""
        assert backend.transition.locked()
        t0 = time.perf_counter()
        backend.set_state(State.SWAPPING_IN)
        kept = backend.residual_reservation.gib if backend.residual_reservation else 0.0
        try:
            await self._reserve(backend, max(0.0, float(backend.memory_gib or 0) - kept))
        except BaseException:
            if backend.state == State.SWAPPING_IN:  # not if the engine died meanwhile (failed)
                backend.set_state(State.SWAPPED_OUT)
            raise
        if backend.state != State.SWAPPING_IN or backend.runtime is None:
            # the engine exited while this swap-in waited for memory (its watcher failed it)
            backend.release_reservation()
            raise EngineUnavailable(f"model '{backend.name}' exited while it was being swapped in: {backend.error}")
        steps = SwapSteps()
        runtime = backend.runtime
        pids = list(backend.checkpointed_pids)
        try:
            await steps.run("thaw", runtime.thaw, undo=runtime.freeze)
            await self.restore_gpu(steps, pids)
            if backend.slept:
                await steps.run("wake", lambda: backend.adapter.wake(self.client, backend.base_url or ""),
                                undo=lambda: backend.adapter.sleep(self.client, backend.base_url or ""))
        except (SwapStepError, asyncio.CancelledError) as exc:
            self._record(backend, "swap-in failed", steps)
            backend.release_reservation()
            if isinstance(exc, SwapStepError) and exc.unwound and runtime.running:
                backend.set_state(State.SWAPPED_OUT)
                backend.error = f"swap-in failed at {exc.step}: {exc.cause}"
            else:
                await self._fail(backend, f"swap-in failed and could not be undone: {exc}")
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise EngineUnavailable(f"model '{backend.name}' could not be swapped in: {exc}") from None
        backend.checkpointed_pids = []
        backend.slept = False
        elapsed = time.perf_counter() - t0
        backend.last_swap_in_seconds = elapsed
        backend.swap_in_history.append((time.time(), elapsed))
        backend.swaps_in += 1
        backend.last_used = time.time()
        backend.resident_since = time.monotonic()
        backend.served_since_swap_in = False
        self._record(backend, "swap-in", steps)
        backend.set_state(State.RUNNING)

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
        """sleep → lock → checkpoint → freeze, after in-flight requests have finished."""
        t0 = time.perf_counter()
        backend.set_state(State.SWAPPING_OUT)
        steps = SwapSteps()
        runtime, ckpt = backend.runtime, self.checkpointer
        try:
            async with backend.rw.write(timeout=backend.config.drain_timeout):
                real_gpu = not self.is_virtual(backend)
                sleeps = real_gpu and backend.adapter.supports_sleep
                can_checkpoint = bool(getattr(ckpt, "available", False))
                option = backend.config.residual
                if real_gpu and not can_checkpoint and not (sleeps and option in ("keep", "auto")):
                    # freezing alone would hand back a reservation whose memory stays on the GPU
                    raise SwapStepError("checkpoint", RuntimeError(
                        "this driver has no CUDA checkpoint API, so the engine's GPU memory cannot be freed"),
                        unwound=True)
                keep_residual = False
                residual = 0.0
                if sleeps:
                    full = backend.reservation.gib if backend.reservation is not None else 0.0
                    # overlapped eviction, first half: what the hook frees is handed over while it runs
                    await steps.run("sleep", lambda: self._sleep_handing_over(backend),
                                    undo=lambda: self._regrow_and_wake(backend, full), undo_if_failed=True)
                    # decided after the sleep, when the residual can be measured (once: an NVML query)
                    residual = self._residual_gib(backend)
                    backend.residual_gib = residual
                    keep_residual = keeps_residual(option,
                                                   not can_checkpoint or self._room_for_residual(backend, residual))
                    if not keep_residual and backend.reservation is not None:
                        # overlapped eviction: the weights and KV cache left with the sleep hook; hand
                        # the rest over now, while the residual is checkpointed (undo: take it back)
                        await steps.run("release weights", lambda: self._shrink_to(backend, residual),
                                        undo=lambda: self._regrow(backend, full))
                # residual: keep — what the sleeping engine still holds stays on the GPU, unmoved
                pids = self.monitor.gpu_pids(runtime.pids()) if real_gpu and not keep_residual else []
                await self._checkpoint_and_freeze(steps, runtime, pids)
        except asyncio.CancelledError:
            # cancelled while draining (no step has run, or SwapSteps already undid them): still running
            self._record(backend, "swap-out cancelled", steps)
            if backend.state == State.SWAPPING_OUT:
                backend.set_state(State.RUNNING)
            raise
        except (SwapStepError, DrainTimeout) as exc:
            self._record(backend, "swap-out failed", steps)
            if isinstance(exc, SwapStepError) and not exc.unwound:
                await self._fail(backend, f"swap-out failed and could not be undone: {exc}")
            else:
                backend.set_state(State.RUNNING)
                backend.error = f"swap-out ({reason}) abandoned: {exc}"
            raise
        backend.slept = any(t.step == "sleep" for t in steps.timings)
        backend.checkpointed_pids = pids
        if keep_residual:
            self._keep_residual(backend, residual)
        backend.release_reservation()
        elapsed = time.perf_counter() - t0
        backend.last_swap_out_seconds = elapsed
        backend.swaps_out += 1
        self._record(backend, f"swap-out ({reason})", steps)
        backend.set_state(State.SWAPPED_OUT)

    async def _checkpoint_and_freeze(self, steps: SwapSteps, runtime: Any, pids: list[int]) -> None:
        """lock every GPU process → checkpoint each → freeze: the driver needs the processes running
        (a frozen one hangs it), and nothing may run once their memory is gone."""
        await self.checkpoint_gpu(steps, pids)
        await steps.run("freeze", runtime.freeze, undo=runtime.thaw, undo_if_failed=True)

    async def checkpoint_gpu(self, steps: SwapSteps, pids: list[int]) -> None:
        """lock every process, then checkpoint each (its GPU memory to the host); undone in reverse."""
        ckpt = self.checkpointer
        for pid in pids:
            await steps.run("lock", lambda p=pid: self._driver("lock", ckpt.lock, p, self.lock_timeout_ms),
                            undo=lambda p=pid: self._driver("unlock", ckpt.unlock, p))
        for pid in pids:
            await steps.run("checkpoint", lambda p=pid: self._driver("checkpoint", ckpt.checkpoint, p),
                            undo=lambda p=pid: self._driver("restore", ckpt.restore, p))

    async def restore_gpu(self, steps: SwapSteps, pids: list[int]) -> None:
        """restore every checkpointed process, then unlock each (never on a frozen one: it hangs)."""
        ckpt = self.checkpointer
        for pid in pids:
            await steps.run("restore", lambda p=pid: self._driver("restore", ckpt.restore, p),
                            undo=lambda p=pid: self._driver("checkpoint", ckpt.checkpoint, p))
        for pid in pids:
            await steps.run("unlock", lambda p=pid: self._driver("unlock", ckpt.unlock, p),
                            undo=lambda p=pid: self._driver("lock", ckpt.lock, p, self.lock_timeout_ms))

    def _residual_gib(self, backend: Backend) -> float:
        per_device = self.monitor.process_memory_gib(backend.runtime.pids())
        return max((per_device.get(d, 0.0) for d in backend.devices), default=0.0)

    def _room_for_residual(self, backend: Backend, residual: float) -> bool:
        """residual: auto keeps the residual while the memory the sleep freed still covers everyone
        waiting for memory on its devices (a kept residual costs ~1 GiB; a restore of it ~0.75 s)."""
        held = backend.reservation.gib if backend.reservation is not None else 0.0
        for d in backend.devices:
            manager = self.reservations[d]
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

    async def _checkpoint_residual(self, backend: Backend) -> None:
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
                await self._checkpoint_and_freeze(steps, runtime, pids)
            except SwapStepError as exc:
                self._record(backend, "residual checkpoint failed", steps)
                if not exc.unwound:
                    await self._fail(backend, f"checkpoint of its kept residual failed and could not be undone: {exc}")
                if exc.cancelled:
                    raise asyncio.CancelledError from exc
                return
            backend.checkpointed_pids = pids
            backend.residual_reservation.release()
            backend.residual_reservation = None
            self._record(backend, "residual checkpointed to make room", steps)

    async def restore_residuals(self) -> None:
        """Bring checkpointed `residual: auto` residuals back to the GPU while there is room (the
        policy says which), so the next swap-in is thaw → wake. Engines in a transition are left alone."""
        if not getattr(self.checkpointer, "available", False):
            return
        for device, manager in self.reservations.items():
            moving = {State.STARTING, State.SWAPPING_IN, State.SWAPPING_OUT}
            busy = any(device in b.devices and (b.state in moving or b.transition.locked())
                       for b in self.backends.values())
            if busy or self._device_locks[device].locked():
                continue  # someone is making room or moving in or out: memory is not idle on this device
            candidates = {
                b.name: b for b in self.backends.values()
                if b.devices == [device] and b.state == State.SWAPPED_OUT and b.slept and b.checkpointed_pids
                and b.residual_reservation is None and b.config.residual == "auto" and b.residual_gib > 0
                and not b.transition.locked() and not self.is_virtual(b)}
            snapshots = [ResidualSnapshot(b.name, b.residual_gib, b.last_used, b.config.residual)
                         for b in candidates.values()]
            # under the device lock: no reservation (and no residual checkpoint to make room) runs meanwhile
            async with self._device_locks[device]:
                for name in residuals_to_restore(snapshots, manager.free_gib, bool(manager.waiting())):
                    await self._restore_residual(candidates[name])

    async def _restore_residual(self, backend: Backend) -> None:
        """thaw → restore → unlock → freeze: the sleeping engine's residual is on the GPU again (as if
        kept), its reservation taken first; every step undone in reverse if one fails."""
        if backend.transition.locked():
            return
        async with backend.transition:
            if backend.state != State.SWAPPED_OUT or not backend.checkpointed_pids:
                return
            manager = self.reservations[backend.device]
            reservation = manager.try_acquire(backend.name, backend.residual_gib)
            if reservation is None:
                return  # taken meanwhile
            backend.residual_reservation = reservation  # booked before the memory is on the GPU
            steps = SwapSteps()
            runtime, pids = backend.runtime, list(backend.checkpointed_pids)
            try:
                await steps.run("thaw", runtime.thaw, undo=runtime.freeze)
                await self.restore_gpu(steps, pids)
                await steps.run("freeze", runtime.freeze, undo=runtime.thaw, undo_if_failed=True)
            except SwapStepError as exc:
                self._record(backend, "residual restore failed", steps)
                if exc.unwound:  # back on the host: the booking goes; otherwise _fail releases it
                    reservation.release()
                    backend.residual_reservation = None
                if not exc.unwound:
                    await self._fail(backend, f"restore of its residual failed and could not be undone: {exc}")
                if exc.cancelled:
                    raise asyncio.CancelledError from exc
                return
            backend.checkpointed_pids = []
            self._record(backend, "swap-in of the residual (room to keep it)", steps)
            backend.on_change()

    def _keep_residual(self, backend: Backend, residual: float) -> None:
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

    async def swap_out_idle(self) -> None:
        now = time.time()
        for b in list(self.backends.values()):
            timeout = b.config.idle_timeout
            if (timeout is not None and not b.config.pinned and b.state == State.RUNNING
                    and b.queued == 0 and b.in_flight == 0 and now - b.last_used >= timeout):
                await self.swap_out(b, reason=f"idle for {timeout:g} s")

    # ---- failure and stop ------------------------------------------------------------------
    async def _watch(self, backend: Backend, runtime: Any) -> None:
        code = await runtime.wait()
        if backend.runtime is runtime and not backend.intentional_stop:
            reason = f"engine exited with code {code}: {self._last_log_line(backend)}"
            await self._fail(backend, reason)

    async def _fail(self, backend: Backend, reason: str) -> None:
        log.error("model %s failed: %s", backend.name, reason)  # every failure, with its reason, in the server log
        for observer in self.observers:
            observer.engine_failed(backend.name, reason)
        backend.failures += 1
        backend.failed_at = time.monotonic()
        backend.release_all()
        runtime, backend.runtime = backend.runtime, None
        backend.checkpointed_pids = []
        backend.slept = False
        backend.set_state(State.FAILED, reason)
        if runtime is not None:
            backend.intentional_stop = True
            await runtime.stop()  # also removes the cgroup of a process that already died

    async def stop(self, backend: Backend) -> None:
        runtime, backend.runtime = backend.runtime, None
        backend.intentional_stop = True
        if runtime is not None:
            await runtime.stop()
        if backend.watcher is not None:
            backend.watcher.cancel()
        backend.release_all()
        backend.checkpointed_pids = []
        backend.set_state(State.STOPPED)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*(self.stop(b) for b in self.backends.values()), return_exceptions=True)
        await self.client.aclose()


__all__ = ["CheckpointError", "EngineUnavailable", "Scheduler"]

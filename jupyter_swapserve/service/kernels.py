"""Notebook kernels as GPU tenants: their GPU memory is booked like a model's, and an idle kernel
is swapped out with the CUDA checkpoint API (lock → checkpoint, **never** a freeze: the kernel
keeps answering Jupyter's heartbeats, and a CUDA call simply blocks until restore + unlock) and
swapped back in (reserve, evicting if needed → restore → unlock) before its next cell runs.

This module knows nothing of Jupyter: the server side (:mod:`jupyter_swapserve.kernel_watch`)
reports each kernel's facts (:class:`KernelFacts`: pids, user, notebook, busy, last execution)
with :meth:`KernelTenants.observe`, or is asked for them (:class:`KernelFactsSource`); the
decisions are the pure functions of :mod:`.kernel_policy`; the memory comes from the same placement
as a model's (:mod:`.placement`: kernels are one of its tenant sources); the steps are the driver's
pairs, timed and unwound like a model's (:mod:`.steps`), and kernels move through the same state
machine (:mod:`.states`; a ``running`` kernel is shown as "resident").

    swap-out: lock → checkpoint each GPU process → release the reservation       (never a freeze)
    swap-in:  the user's limit (their other idle kernels out) → reserve (evicting) → restore → unlock
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..runtime.procfs import rss_bytes
from .background import Background
from .clock import Clock
from .events import Notifier
from .kernel_policy import KernelView, due_for_swap_out, kernel_snapshot, may_pin, over_user_limit
from .placement import Placement
from .policy import BackendSnapshot, ResidualSnapshot
from .reservations import Reservation
from .states import KERNEL_LABELS, State, Tenant
from .steps import DriverSteps, StepTiming, SwapRecord, SwapStepError, SwapSteps

log = logging.getLogger(__name__)

PREFIX = "kernel "
#: after an execution was sent, the kernel counts as busy this long even before it says so itself
BUSY_GRACE_S = 2.0


class KernelSwapError(RuntimeError):
    """A kernel could not be swapped in or out; the message says why (shown to the user)."""


@dataclass(frozen=True)
class KernelFacts:
    """What the Jupyter server knows of one of its kernels, each sweep."""

    kernel_id: str
    user: str
    path: str
    pids: tuple[int, ...]  # the kernel process and its descendants
    busy: bool
    last_execution: float  # time.time()


class KernelFactsSource(Protocol):
    """Where the facts of the server's kernels come from (the Jupyter side: kernel_watch.py)."""

    async def facts(self) -> list[KernelFacts]: ...


#: a user's limits: (GiB their resident kernels may hold, GiB they may pin); None: no limit
Limits = Callable[[str], tuple[float | None, float | None]]


def no_limits(user: str) -> tuple[float | None, float | None]:
    return None, None


class ProcessMemory(Protocol):
    """What measuring a kernel's processes needs of the GPU monitor (gpu/monitor.py's GpuMonitor)."""

    def process_memory_gib(self, pids: list[int]) -> dict[int, float]: ...

    def all_virtual(self, devices: list[int]) -> bool: ...


def measure_processes(monitor: ProcessMemory, pids: tuple[int, ...], virtual: bool) -> tuple[int, float]:
    """(device, GiB) the processes hold: NVML on a real GPU; host memory when counted virtually.
    The one measure of a kernel, whether the service books it or a user's server reports it."""
    per_device = monitor.process_memory_gib(list(pids))
    if per_device:
        device = max(per_device, key=lambda d: per_device[d])
        return device, per_device[device]
    if virtual and monitor.all_virtual([0]):
        return 0, rss_bytes(pids) / 1024**3  # the measure of an engine on a virtual device, too
    return 0, 0.0


@dataclass
class KernelTenant(Tenant):
    kernel_id: str
    user: str
    path: str
    device: int
    pids: tuple[int, ...] = ()
    gib: float = 0.0
    state: State = State.RUNNING  # a kernel becomes a tenant holding its memory
    busy: bool = False
    last_execution: float = 0.0
    pinned: bool = False
    release_requested: bool = False
    #: time.time() when an execution was last sent through the server: busy until the kernel's own
    #: activity is newer (its busy status may come a moment later), at most BUSY_GRACE_S
    execution_sent_at: float = 0.0
    reservation: Reservation | None = None
    checkpointed_pids: list[int] = field(default_factory=list)
    last_swap_in_seconds: float | None = None
    last_swap_out_seconds: float | None = None
    #: why it last left the GPU: "idle for 600 s", "preempted for <model>", "released by its user", ...
    last_swap_out_reason: str | None = None
    swaps_in: int = 0
    swaps_out: int = 0
    last_steps: list[StepTiming] = field(default_factory=list)
    swap_in_history: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=50))
    error: str | None = None
    transition: asyncio.Lock = field(default_factory=asyncio.Lock)
    on_change: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def name(self) -> str:
        return PREFIX + self.kernel_id

    @property
    def state_label(self) -> str:
        """The state as users read it ("resident" for a kernel holding its memory)."""
        state = State(self.state)  # also a plain string: a status built by hand (tests, schema checks)
        return KERNEL_LABELS.get(state, state.value)

    def view(self) -> KernelView:
        return KernelView(self.name, self.user, self.device, self.state, self.busy, self.pinned, self.gib,
                          self.last_execution, self.release_requested)

    def status(self) -> dict[str, Any]:
        return {
            "kernel_id": self.kernel_id, "name": self.name, "user": self.user, "path": self.path,
            "device": self.device, "memory_gib": round(self.gib, 4),
            "state": self.state_label,
            "busy": self.busy, "pinned": self.pinned, "last_execution": self.last_execution or None,
            "reserved_gib": round(self.reservation.gib, 4) if self.reservation is not None else 0.0,
            "last_swap_in_seconds": self.last_swap_in_seconds, "last_swap_out_seconds": self.last_swap_out_seconds,
            "last_swap_out_reason": self.last_swap_out_reason, "swaps_in": self.swaps_in, "swaps_out": self.swaps_out,
            "swap_in_history": [{"t": t, "seconds": s} for t, s in self.swap_in_history],
            "last_steps": [{"step": s.step, "seconds": s.seconds, "ok": s.ok} for s in self.last_steps],
            "pids": list(self.pids), "error": self.error,
        }


class KernelTenants:
    """The kernels holding GPU memory on this server's devices, and their swaps. A tenant source of
    placement (:class:`.placement.TenantSource`): its kernels are victims ranked by the same policy
    as models, and its reservations come from the same code."""

    def __init__(self, placement: Placement, driver: DriverSteps, record: SwapRecord, monitor: Any,
                 notifier: Notifier, background: Background, *, idle_timeout: float | None = None,
                 virtual: bool = False, limits: Limits = no_limits, facts: KernelFactsSource | None = None,
                 interval: float = 2.0, clock: Clock | None = None) -> None:
        self.placement = placement
        self.driver = driver
        self.record = record
        self.monitor = monitor
        self.notifier = notifier
        self.background = background
        #: swap a kernel out after this many seconds without execution (None: only on demand)
        self.idle_timeout = idle_timeout
        #: count kernels on a virtual device by their resident host memory (demos and CPU tests:
        #: bookkeeping only, no checkpoint — nothing is on a GPU)
        self.virtual = virtual
        self.limits = limits
        #: the kernels' facts, asked for every ``interval`` seconds and before acting on a user's request
        self.facts = facts
        self.interval = interval
        self.clock = clock or Clock()
        self.tenants: dict[str, KernelTenant] = {}
        self._growing: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None

    # ---- placement's view (TenantSource) -------------------------------------------------------
    def owns(self, name: str) -> bool:
        return self._by_name(name) is not None

    def label(self, name: str) -> str:
        return name

    def snapshots(self) -> list[BackendSnapshot]:
        return [kernel_snapshot(t.view()) for t in self.tenants.values()]

    def _by_name(self, name: str) -> KernelTenant | None:
        return self.tenants.get(name[len(PREFIX):]) if name.startswith(PREFIX) else None

    async def evict(self, name: str, reason: str) -> bool:
        tenant = self._by_name(name)
        return tenant is not None and await self.swap_out(tenant.kernel_id, reason)

    def holds(self, name: str) -> bool:
        tenant = self._by_name(name)
        return tenant is not None and tenant.state == State.RUNNING

    def error(self, name: str) -> str | None:
        tenant = self._by_name(name)
        return tenant.error if tenant is not None else None

    def pinned_gib(self, device: int, requester: str) -> float:
        return sum(t.reservation.gib for t in self.tenants.values()
                   if t.pinned and t.reservation is not None and t.device == device and t.name != requester)

    def residuals(self, device: int) -> list[ResidualSnapshot]:
        return []  # a kernel is never put to sleep: it has no residual

    async def checkpoint_residual(self, name: str) -> None:
        raise KeyError(name)

    # ---- facts from the server ---------------------------------------------------------------
    def _measure(self, pids: tuple[int, ...]) -> tuple[int, float]:
        return measure_processes(self.monitor, pids, self.virtual)

    async def refresh(self) -> None:
        """A fresh sweep of the kernels' facts (busy or idle as of now), when there is a source."""
        if self.facts is not None:
            await self.observe(await self.facts.facts())

    async def observe(self, facts: list[KernelFacts]) -> None:
        """One sweep: update every kernel, book what resident ones hold, forget the ones that are
        gone, swap in kernels that run while swapped out (an execution that reached them another
        way than the websocket), and swap out the due ones."""
        seen = set()
        for f in facts:
            seen.add(f.kernel_id)
            tenant = self.tenants.get(f.kernel_id)
            if tenant is not None and tenant.pids[:1] != f.pids[:1] and not tenant.transition.locked():
                # the kernel was restarted (same id, new process): what was checkpointed died with the old one
                log.info("kernel %s restarted: its GPU state starts afresh", f.kernel_id)
                self.forget(f.kernel_id)
                tenant = None
            if tenant is not None:
                self._update(tenant, f)
            else:
                self._admit(f)
        for kernel_id in [k for k in self.tenants if k not in seen]:
            self.forget(kernel_id)
        await self.swap_out_due()

    def _update(self, tenant: KernelTenant, f: KernelFacts) -> None:
        tenant.user, tenant.path, tenant.pids = f.user, f.path, f.pids
        sent = tenant.execution_sent_at
        in_grace = f.last_execution < sent and self.clock.time() < sent + BUSY_GRACE_S
        tenant.busy = f.busy or in_grace
        tenant.last_execution = max(tenant.last_execution, f.last_execution)
        if tenant.state == State.SWAPPED_OUT and f.busy:
            self.background.spawn(self.swap_in(f.kernel_id), f"swap-in of busy kernel {f.kernel_id}")
        elif tenant.state == State.RUNNING and not tenant.transition.locked():
            self._rebook(tenant)

    def _admit(self, f: KernelFacts) -> None:
        device, gib = self._measure(f.pids)
        if gib <= 0:
            return  # holds no GPU memory: not a tenant
        tenant = KernelTenant(f.kernel_id, f.user, f.path, device, f.pids, gib, busy=f.busy,
                              last_execution=f.last_execution, on_change=self.notifier.notify)
        self.tenants[f.kernel_id] = tenant
        log.info("kernel %s (%s, %s) holds %.2f GiB on device %d", f.kernel_id, f.user, f.path, gib, device)
        self._rebook(tenant)

    def _rebook(self, tenant: KernelTenant) -> None:
        """Keep a resident kernel's reservation equal to what it holds now. Shrinking is immediate;
        growing books free memory, or evicts in the background (the kernel already has the memory:
        the books must follow reality)."""
        _device, gib = self._measure(tenant.pids)
        if gib <= 0 and tenant.reservation is None:
            return
        tenant.gib = gib
        manager = self.placement.managers[tenant.device]
        if tenant.reservation is None:
            tenant.reservation = manager.try_acquire(tenant.name, min(gib, manager.capacity_gib))
            if tenant.reservation is None:
                self._grow(tenant, gib)
            self.notifier.notify()
            return
        held = tenant.reservation.gib
        if gib < held - 1e-6:
            tenant.reservation.resize(gib)
        elif gib > held + 1e-6:
            try:
                tenant.reservation.resize(min(gib, manager.capacity_gib))
            except Exception:
                self._grow(tenant, gib - held)

    def _grow(self, tenant: KernelTenant, gib: float) -> None:
        if tenant.kernel_id in self._growing:
            return
        self._growing.add(tenant.kernel_id)

        async def grow() -> None:
            try:
                extra = await self.placement.reserve_on(tenant.name, tenant.device, gib)
                if self.tenants.get(tenant.kernel_id) is not tenant or tenant.state != State.RUNNING:
                    extra.release()  # gone or swapped out meanwhile: nothing of it is on the GPU to book
                elif tenant.reservation is None:
                    tenant.reservation = extra
                else:
                    extra.transfer_to(tenant.reservation, extra.gib)
                    extra.release()
            finally:
                self._growing.discard(tenant.kernel_id)

        self.background.spawn(grow(), f"booking the GPU memory of kernel {tenant.kernel_id}")

    def forget(self, kernel_id: str) -> None:
        """The kernel is gone (shut down, died): its memory with it."""
        tenant = self.tenants.pop(kernel_id, None)
        if tenant is not None and tenant.reservation is not None:
            tenant.reservation.release()
            tenant.reservation = None
        self.notifier.notify()

    async def swap_out_due(self) -> None:
        views = [t.view() for t in self.tenants.values()]
        due = due_for_swap_out(views, self.clock.time(), self.idle_timeout)
        for user in {v.user for v in views}:
            over, _enough = over_user_limit(views, user, self.limits(user)[0])
            due += [name for name in over if name not in due]
        for name in due:
            tenant = self._by_name(name)
            if tenant is not None:
                reason = "released by its user" if tenant.release_requested else (
                    f"idle for {self.idle_timeout:g} s" if self.idle_timeout is not None else "over the user's limit")
                await self.swap_out(tenant.kernel_id, reason)

    # ---- swaps -------------------------------------------------------------------------------
    def _gpu_pids(self, tenant: KernelTenant) -> list[int]:
        return [] if self.monitor.all_virtual([tenant.device]) else self.monitor.gpu_pids(list(tenant.pids))

    async def swap_out(self, kernel_id: str, reason: str) -> bool:
        """resident → swapped_out: lock → checkpoint each GPU process, then give the memory back.
        False when the kernel is busy, pinned, not resident, or a step failed (then undone)."""
        tenant = self.tenants.get(kernel_id)
        if tenant is None:
            return False
        async with tenant.transition:
            if tenant.state != State.RUNNING or tenant.busy or tenant.pinned:
                return False
            t0 = time.perf_counter()
            tenant.set_state(State.SWAPPING_OUT)
            steps = SwapSteps()
            pids = self._gpu_pids(tenant)
            try:
                await self.driver.checkpoint(steps, pids)  # and no freeze, ever
            except BaseException as exc:  # a failed step (SwapStepError) or a cancellation, both unwound
                self.record.swap(tenant, "swap-out failed", steps)
                tenant.set_state(State.RUNNING)
                tenant.error = f"swap-out ({reason}) failed: {exc}"
                if isinstance(exc, SwapStepError):
                    return False
                raise
            tenant.release_requested = False
            tenant.error = None
            if tenant.reservation is not None:
                tenant.reservation.release()
                tenant.reservation = None
            tenant.swapped_out(time.perf_counter() - t0, pids)
            tenant.last_swap_out_reason = reason
            self.record.swap(tenant, f"swap-out ({reason})", steps)
            tenant.set_state(State.SWAPPED_OUT)
            return True

    async def swap_in(self, kernel_id: str) -> float:
        """swapped_out → resident: reserve its memory (evicting by the policy) → restore → unlock.
        Returns the seconds it took (0 when it was resident). Raises KernelSwapError."""
        tenant = self.tenants.get(kernel_id)
        if tenant is None:
            return 0.0
        async with tenant.transition:
            if tenant.state == State.RUNNING:
                return 0.0
            t0 = time.perf_counter()
            tenant.set_state(State.SWAPPING_IN)
            steps = SwapSteps()
            try:
                await self._within_user_limit(tenant)
                tenant.reservation = await self.placement.reserve_on(tenant.name, tenant.device, tenant.gib)
                await self.driver.restore(steps, list(tenant.checkpointed_pids))
            except BaseException as exc:  # a failure or a cancellation: what it holds goes back
                self.record.swap(tenant, "swap-in failed", steps)
                if tenant.reservation is not None:
                    tenant.reservation.release()
                    tenant.reservation = None
                tenant.set_state(State.SWAPPED_OUT)
                tenant.error = f"swap-in failed: {exc}"
                if isinstance(exc, Exception) and not isinstance(exc, KernelSwapError):
                    raise KernelSwapError(f"the kernel's GPU state could not be restored: {exc}") from None
                raise
            tenant.swapped_in(time.perf_counter() - t0)
            if self.tenants.get(kernel_id) is not tenant and tenant.reservation is not None:
                tenant.reservation.release()  # the kernel was shut down during its swap-in
                tenant.reservation = None
            tenant.last_execution = self.clock.time()  # about to execute: not idle (no immediate swap-out again)
            self.record.swap(tenant, "swap-in", steps)
            tenant.set_state(State.RUNNING)
            return tenant.last_swap_in_seconds or 0.0

    async def _within_user_limit(self, tenant: KernelTenant) -> None:
        """The user's other idle kernels make room within their limit first; KernelSwapError when
        even that is not enough."""
        limit = self.limits(tenant.user)[0]
        over, enough = over_user_limit([t.view() for t in self.tenants.values()], tenant.user, limit,
                                       keep=tenant.name)
        for name in over:
            other = self._by_name(name)
            if other is not None:
                await self.swap_out(other.kernel_id, "its user's kernels are over their GPU memory limit")
        if not enough:
            raise KernelSwapError(f"the kernels of '{tenant.user}' would hold more than their limit of "
                                  f"{limit:g} GiB of GPU memory; shut down or release another kernel")

    def tracks(self, kernel_id: str) -> bool:
        """Whether the kernel is a tenant (its websocket then watches for executions)."""
        return kernel_id in self.tenants

    def begin_execution(self, kernel_id: str) -> bool:
        """An execution (or comm message) is about to reach the kernel: from now on it is busy (never
        a victim). True when its GPU state must come back first (swapped out, or in a swap)."""
        tenant = self.tenants.get(kernel_id)
        if tenant is None:
            return False
        tenant.busy = True
        tenant.execution_sent_at = tenant.last_execution = self.clock.time()
        return tenant.state != State.RUNNING or tenant.transition.locked()

    # ---- the user's controls (%gpu) ------------------------------------------------------------
    def release(self, kernel_id: str) -> str:
        """Swap out as soon as the kernel is idle (the %gpu magic runs inside a busy kernel)."""
        tenant = self.tenants.get(kernel_id)
        if tenant is None:
            return "not a GPU tenant: the kernel holds no GPU memory"
        if tenant.pinned:
            raise KernelSwapError("the kernel is pinned; unpin it first")
        if tenant.state != State.RUNNING:
            return f"already {tenant.state.value.replace('_', ' ')}"
        tenant.release_requested = True
        return "will be swapped out as soon as the cell finishes"

    def pin(self, kernel_id: str, pinned: bool) -> str:
        tenant = self.tenants.get(kernel_id)
        if tenant is None:
            raise KernelSwapError("the kernel holds no GPU memory, so there is nothing to pin")
        if pinned and not tenant.pinned:
            limit = self.limits(tenant.user)[1]
            if not may_pin([t.view() for t in self.tenants.values()], tenant.user, tenant.name, limit):
                raise KernelSwapError(f"pinning would exceed the {limit:g} GiB of kernel GPU memory "
                                      f"'{tenant.user}' may pin")
        tenant.pinned = pinned
        tenant.release_requested = False
        self.notifier.notify()
        return "pinned: it stays on the GPU" if pinned else "unpinned"

    # ---- housekeeping --------------------------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        return [t.status() for t in self.tenants.values()]

    def start(self) -> None:
        """Sweep the kernels' facts every ``interval`` seconds (when there is a source)."""
        if self.facts is not None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="swapserve-kernels")

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # keep watching; one bad sweep must not end kernel tenancy
                log.exception("kernel sweep failed")
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        """Server shutdown: restore what was checkpointed (a kernel outliving the server, e.g. one
        owned by an external kernel provisioner, must not be left without its GPU state)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for tenant in list(self.tenants.values()):
            if tenant.state == State.SWAPPED_OUT and tenant.checkpointed_pids:
                for step in ("restore", "unlock"):
                    for pid in tenant.checkpointed_pids:
                        with contextlib.suppress(Exception):
                            await self.driver.call(step, pid)
            self.forget(tenant.kernel_id)

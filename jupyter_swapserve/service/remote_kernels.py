"""Notebook kernels of users' servers as tenants of the shared service's GPUs: the service decides,
the owner acts.

On the shared node the kernels live in the users' own Jupyter servers, the GPU's books here. Each
server reports the kernels that hold GPU memory (``POST /swapserve/api/kernel-reports``, every few
seconds); the service books them in the same reservations as the models and ranks them with the
same pure policy, as the kernels of a standalone server (:class:`RemoteKernels` *is* a
:class:`.kernels.KernelTenants`: booking, limits, release and pin are that class's, one code path).
What differs is who acts and where the facts come from:

- **Reports are leases.** A server that stops reporting for ``lease_s`` (killed, culled, network
  gone) is its kernels' *lost* owner: they are no victims any more (nobody could move them), and
  their booking follows what the service itself measures of their processes (NVML; host memory as
  the stand-in on a virtual device) until the process is gone. The books never claim memory free
  that a live process holds, and nothing stays booked for a process that has ended.
- **Commands.** To swap a kernel out (a victim, the idle timeout, a release, an admin) the service
  asks the owning server over the command channel that server opened (:mod:`.kernel_owners`); the
  owner locks and checkpoints, and answers. The memory is free once NVML shows it freed (on a
  virtual device, once the owner says so). An owner that does not answer in time is not asked
  again for a while, and placement picks another victim.
- **Swap-in** (``POST /swapserve/api/kernels/<id>/swap-in``, sent by the owner when a cell reaches
  a checkpointed kernel, or by its user): the reservation is queued and granted like any request,
  evicting by policy; then the owner is told to restore, and the kernel is resident on its answer.

Identity: a report and an answer are taken only for the token's owner. A kernel booked for one
user or server cannot be reported by another, and a process is booked only when it is visibly a
process of that user (``JUPYTERHUB_USER`` in its environment, or the user's system account).

    swap-out: command "swap-out" → owner: lock → checkpoint → answer → NVML shows it freed → release
    swap-in:  the user's limit → reserve (evicting) → command "swap-in" → owner: restore → unlock → answer
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pwd
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..runtime import procfs
from .kernel_owners import OwnerAnswer, OwnerChannels, OwnerUnreachable
from .kernel_policy import KernelView, may_pin
from .kernels import KernelSwapError, KernelTenant, KernelTenants
from .states import State
from .steps import SwapSteps

log = logging.getLogger(__name__)

#: what NVML may still show of a process that was checkpointed (its CUDA context's last pages)
FREED_SLACK_GIB = 0.05
#: an owner that let a command time out is not asked again for this long (unless it answers)
UNANSWERED_BACKOFF_S = 60.0


@dataclass(frozen=True)
class KernelReport:
    """What a user's server says of one of its kernels."""

    kernel_id: str
    path: str
    pids: tuple[int, ...]  # the kernel process first, then its descendants
    #: the kernel process's start time (clock ticks since boot): with the pid, one process for good
    start: str
    busy: bool
    last_execution: float
    resident: bool  # False: the server checkpointed it
    gib: float  # what the server measured (of what it moved, when swapped out)
    pinned: bool = False
    #: how many swaps its server has done of it: a report that crossed a swap's answer on the way
    #: (made before, taken after) has fewer, and says nothing about where the memory is now
    moves: int = 0


@dataclass(frozen=True)
class ServerReport:
    user: str  # the owner of the token that sent it
    server: str  # the server's name ("" for a user's default server)
    host: str  # the boot id of the server's machine (procfs.boot_id)
    kernels: tuple[KernelReport, ...]


class ReportRefused(PermissionError):
    """The report names a kernel or a process that is not the token owner's (403)."""


@dataclass
class RemoteKernelTenant(KernelTenant):
    server: str = ""
    #: monotonic time until which the last report holds
    lease_until: float = 0.0
    #: time.time() when its server stopped reporting; None while it reports
    owner_lost_at: float | None = None
    #: monotonic time until which its server is not asked (it let a command time out)
    unanswered_until: float = 0.0
    #: the start time of each of its processes, as this service saw them (a reused pid is not them)
    starts: dict[int, str] = field(default_factory=dict)
    #: the swaps its server has done, as last heard (its answers and reports)
    moves: int = 0
    #: whether its owner can be asked now (given by RemoteKernels)
    answering: Callable[[], bool] = field(default=lambda: False, repr=False)

    def owner_state(self) -> str:
        if self.owner_lost_at is not None:
            return "lost"
        return "answering" if self.answering() else "not answering"

    def view(self) -> KernelView:
        return KernelView(self.name, self.user, self.device, self.state, self.busy, self.pinned, self.gib,
                          self.last_execution, self.release_requested, owner_answers=self.answering())

    def status(self) -> dict[str, Any]:
        return {**super().status(), "server": self.server, "owner": self.owner_state()}


class RemoteKernels(KernelTenants):
    """The kernels of users' servers on this node's devices (a tenant source of placement)."""

    def __init__(self, *args: Any, owners: OwnerChannels, lease_s: float = 15.0, answer_timeout_s: float = 10.0,
                 freed_timeout_s: float = 15.0, host: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owners = owners
        self.lease_s = lease_s
        self.answer_timeout_s = answer_timeout_s
        self.freed_timeout_s = freed_timeout_s
        #: this node (procfs.boot_id): reports from servers on another host book nothing here
        self.host = procfs.boot_id() if host is None else host
        self._watchers: list[asyncio.Task[None]] = []

    def _answers(self, tenant: RemoteKernelTenant) -> bool:
        return (tenant.owner_lost_at is None and self.clock.monotonic() >= tenant.unanswered_until
                and self.owners.connected(tenant.user, tenant.server))

    def _of(self, user: str, server: str) -> list[RemoteKernelTenant]:
        return [t for t in self.tenants.values()
                if isinstance(t, RemoteKernelTenant) and t.user == user and t.server == server]

    # ---- reports ---------------------------------------------------------------------------------
    def report(self, report: ServerReport) -> dict[str, Any]:
        """Take one server's report: book what its kernels hold, renew its lease, forget the kernels
        it no longer reports. :class:`ReportRefused` when it names what is not its user's."""
        self._check(report)
        if report.host != self.host:
            return {"node": "elsewhere", "lease_s": self.lease_s, "kernels": {}}
        now = self.clock.monotonic()
        answers = {k.kernel_id: self._take(report, k, now) for k in report.kernels}
        reported = {k.kernel_id for k in report.kernels}
        for tenant in self._of(report.user, report.server):
            if tenant.kernel_id not in reported and not tenant.transition.locked():
                self.forget(tenant.kernel_id)  # shut down (or no GPU memory any more) on its server
        self.notifier.notify()
        return {"node": "here", "lease_s": self.lease_s, "kernels": answers}

    def _check(self, report: ServerReport) -> None:
        for k in report.kernels:
            tenant = self.tenants.get(k.kernel_id)
            if isinstance(tenant, RemoteKernelTenant) and tenant.user != report.user:
                raise ReportRefused(f"kernel '{k.kernel_id}' belongs to another user")
            if tenant is not None and not isinstance(tenant, RemoteKernelTenant):
                raise ReportRefused(f"kernel '{k.kernel_id}' is not a kernel of a user's server")
            if isinstance(tenant, RemoteKernelTenant) and tenant.server != report.server:
                raise ReportRefused(f"kernel '{k.kernel_id}' is reported by another server of {report.user}")
            if report.host != self.host or not visible(k.pids[0], k.start):
                continue  # not a process this service can see (or one ending): nothing of it is booked here
            if not process_of(k.pids[0], report.user):
                raise ReportRefused(f"process {k.pids[0]} of kernel '{k.kernel_id}' is not a process of "
                                    f"{report.user}'s servers")
            other = next((t for t in self.tenants.values() if t.kernel_id != k.kernel_id and t.pids[:1] == k.pids[:1]),
                         None)
            if other is not None:
                raise ReportRefused(f"process {k.pids[0]} is booked as another kernel")

    def _take(self, report: ServerReport, k: KernelReport, now: float) -> dict[str, Any]:
        tenant = self.tenants.get(k.kernel_id)
        if tenant is not None and tenant.pids[:1] != k.pids[:1] and not tenant.transition.locked():
            log.info("kernel %s restarted: its GPU state starts afresh", k.kernel_id)
            self.forget(k.kernel_id)
            tenant = None
        if not visible(k.pids[0], k.start):
            return {"booked": False, "note": "its process is not visible to this service (another PID namespace?), "
                                             "or it has ended"}
        if tenant is None:
            tenant = self._admit_report(report, k)
            if tenant is None:
                return {"booked": False, "note": "it holds no GPU memory on this node"}
        else:
            assert isinstance(tenant, RemoteKernelTenant)
            self._update_report(tenant, k)
        tenant.lease_until = now + self.lease_s
        if tenant.owner_lost_at is not None:
            log.info("kernel %s: its server %r of %s reports again", k.kernel_id, report.server, report.user)
            tenant.owner_lost_at, tenant.error = None, None
        return {"booked": True, "state": tenant.state_label, "pinned": tenant.pinned,
                "reserved_gib": round(tenant.reservation.gib, 4) if tenant.reservation is not None else 0.0}

    def _admit_report(self, report: ServerReport, k: KernelReport) -> RemoteKernelTenant | None:
        device, gib = self._measure(k.pids)
        if not k.resident:
            gib = k.gib  # what it will need back; nothing of it is on the device now
        if gib <= 0:
            return None
        tenant = RemoteKernelTenant(k.kernel_id, report.user, k.path, device, k.pids, gib,
                                    state=State.RUNNING if k.resident else State.SWAPPED_OUT, busy=k.busy,
                                    last_execution=k.last_execution, on_change=self.notifier.notify,
                                    server=report.server, moves=k.moves,
                                    starts={pid: start for pid in k.pids if (start := procfs.start_ticks(pid))})
        tenant.answering = lambda: self._answers(tenant)
        self.tenants[k.kernel_id] = tenant
        if k.pinned and may_pin([t.view() for t in self.tenants.values()], report.user, tenant.name,
                                self.limits(report.user)[1]):
            tenant.pinned = True  # the server remembers a pin the service granted before it restarted
        log.info("kernel %s of %s (server %r, %s) holds %.2f GiB on device %d%s", k.kernel_id, report.user,
                 report.server, k.path, gib, device, "" if k.resident else " (checkpointed by its server)")
        if k.resident:
            self._rebook(tenant)
        return tenant

    def _update_report(self, tenant: RemoteKernelTenant, k: KernelReport) -> None:
        tenant.path, tenant.pids, tenant.busy = k.path, k.pids, k.busy
        tenant.starts = {pid: start for pid in k.pids if (start := procfs.start_ticks(pid)) is not None}
        tenant.last_execution = max(tenant.last_execution, k.last_execution)
        if tenant.transition.locked() or k.moves < tenant.moves:
            return  # a swap is under way (its end sets the books), or the report is older than its answer
        moved, tenant.moves = k.moves > tenant.moves, k.moves
        if tenant.state == State.RUNNING and k.resident:
            self._rebook(tenant)
        elif tenant.state == State.RUNNING and moved and not self._held(tenant):
            # its server checkpointed it without being asked now (a command it answered too late)
            log.info("kernel %s: its server swapped it out; the memory is free", tenant.kernel_id)
            tenant.set_state(State.SWAPPING_OUT)
            self._free(tenant, tuple(tenant.pids), 0.0, SwapSteps(), "swap-out (by its server)")
        elif tenant.state == State.SWAPPED_OUT and k.resident and moved:
            log.info("kernel %s: its server restored it; booking what it holds", tenant.kernel_id)
            tenant.set_state(State.SWAPPING_IN)
            tenant.set_state(State.RUNNING)
            tenant.checkpointed_pids = []
            self._rebook(tenant)

    # ---- what the processes hold ---------------------------------------------------------------
    def _held(self, tenant: RemoteKernelTenant) -> bool:
        """Whether the kernel still holds memory on its device by the service's own measure (NVML).
        On a virtual device nothing moves: there the owner's word is the measure."""
        if self.monitor.all_virtual([tenant.device]):
            return False
        return self.monitor.process_memory_gib(list(tenant.pids)).get(tenant.device, 0.0) > FREED_SLACK_GIB

    async def _until_freed(self, tenant: RemoteKernelTenant) -> None:
        deadline = self.clock.monotonic() + self.freed_timeout_s
        while self._held(tenant):
            if self.clock.monotonic() > deadline:
                held = self.monitor.process_memory_gib(list(tenant.pids)).get(tenant.device, 0.0)
                raise KernelSwapError(f"its server reported the swap-out, but NVML still shows {held:.2f} GiB held")
            await asyncio.sleep(0.1)

    def _free(self, tenant: RemoteKernelTenant, pids: tuple[int, ...], seconds: float, steps: SwapSteps,
              what: str) -> None:
        """swapping_out → swapped_out, the memory back to the books (once it is free)."""
        if tenant.reservation is not None:
            tenant.reservation.release()
            tenant.reservation = None
        tenant.release_requested = False
        tenant.swapped_out(seconds, list(pids))
        self.record.swap(tenant, what, steps)
        tenant.set_state(State.SWAPPED_OUT)

    def _living(self, tenant: RemoteKernelTenant) -> tuple[int, ...]:
        """Its processes that are still the ones it reported (a worker may outlive the kernel)."""
        return tuple(pid for pid, start in tenant.starts.items() if procfs.start_ticks(pid) == start)

    # ---- swaps, done by the owner ----------------------------------------------------------------
    async def swap_out(self, kernel_id: str, reason: str) -> bool:
        """resident → swapped_out by the owning server. False when the kernel is busy, pinned, not
        resident, its owner cannot be asked or does not answer in time, or the owner's steps failed."""
        tenant = self.tenants.get(kernel_id)
        if not isinstance(tenant, RemoteKernelTenant):
            return False
        async with tenant.transition:
            if tenant.state != State.RUNNING or tenant.busy or tenant.pinned or not tenant.answering():
                return False
            t0 = time.perf_counter()
            tenant.set_state(State.SWAPPING_OUT)
            try:
                answer = await self.owners.ask(tenant.user, tenant.server, kernel_id, "swap-out", reason,
                                               answer_timeout=self.answer_timeout_s, gib=tenant.gib)
                if answer.ok:
                    await self._until_freed(tenant)
            except BaseException as exc:  # not answered, not freed, or cancelled: it holds its memory still
                self._not_moved(tenant, exc, f"swap-out ({reason})")
                if isinstance(exc, (OwnerUnreachable, KernelSwapError)):
                    return False
                raise
            tenant.moves = max(tenant.moves, answer.moves)
            if not answer.ok:
                tenant.busy = tenant.busy or answer.busy
                self._not_moved(tenant, KernelSwapError(answer.error or "its server refused"), f"swap-out ({reason})")
                return False
            tenant.error = None
            tenant.last_swap_out_reason = reason
            self._free(tenant, answer.pids, time.perf_counter() - t0, steps_of(answer), f"swap-out ({reason})")
            return True

    def _not_moved(self, tenant: RemoteKernelTenant, exc: BaseException, what: str) -> None:
        """A swap-out that did not happen: the kernel is resident, and booked for what it holds."""
        if isinstance(exc, OwnerUnreachable):
            tenant.unanswered_until = self.clock.monotonic() + UNANSWERED_BACKOFF_S
        tenant.set_state(State.RUNNING)
        tenant.error = f"{what} failed: {exc}"  # after the move: running again would clear it
        log.warning("kernel %s: %s", tenant.kernel_id, tenant.error)
        self._rebook(tenant)

    async def swap_in(self, kernel_id: str) -> float:
        """swapped_out → resident: the reservation (queued, evicting by the policy), then the owner
        restores. Returns the seconds it took (0 when resident). Raises KernelSwapError."""
        tenant = self.tenants.get(kernel_id)
        if not isinstance(tenant, RemoteKernelTenant):
            return 0.0
        async with tenant.transition:
            if tenant.state == State.RUNNING:
                return 0.0
            if tenant.owner_lost_at is not None or not self.owners.connected(tenant.user, tenant.server):
                raise KernelSwapError("its server is not connected to the swap service; try again shortly")
            t0 = time.perf_counter()
            tenant.set_state(State.SWAPPING_IN)
            commanded, answer = False, None
            try:
                await self._within_user_limit(tenant)
                tenant.reservation = await self.placement.reserve_on(tenant.name, tenant.device, tenant.gib)
                commanded = True
                answer = await self.owners.ask(tenant.user, tenant.server, kernel_id, "swap-in", "a cell to run",
                                               answer_timeout=self.answer_timeout_s, gib=tenant.gib)
                if not answer.ok:
                    raise KernelSwapError(answer.error or "its server could not restore it")
            except BaseException as exc:
                self._not_restored(tenant, exc, answer, commanded)
                if isinstance(exc, Exception) and not isinstance(exc, KernelSwapError):
                    raise KernelSwapError(f"the kernel's GPU state could not be restored: {exc}") from None
                raise
            assert answer is not None
            tenant.moves = max(tenant.moves, answer.moves)
            tenant.unanswered_until = 0.0
            tenant.swapped_in(time.perf_counter() - t0)
            tenant.last_execution = self.clock.time()  # about to execute: not idle
            self.record.swap(tenant, "swap-in", steps_of(answer))
            tenant.set_state(State.RUNNING)
            return tenant.last_swap_in_seconds or 0.0

    def _not_restored(self, tenant: RemoteKernelTenant, exc: BaseException, answer: OwnerAnswer | None,
                      commanded: bool) -> None:
        """A swap-in that did not end as asked. When the owner was told to restore and did not say how
        it ended, the kernel may hold its memory: it stays booked (resident) until a report says more."""
        log.warning("kernel %s: swap-in failed: %s", tenant.kernel_id, exc)
        self.record.swap(tenant, "swap-in failed", steps_of(answer or OwnerAnswer(ok=False)))
        if isinstance(exc, OwnerUnreachable):
            tenant.unanswered_until = self.clock.monotonic() + UNANSWERED_BACKOFF_S
        never_sent = isinstance(exc, OwnerUnreachable) and not exc.sent
        if commanded and answer is None and not never_sent:
            tenant.set_state(State.RUNNING)
        else:
            if tenant.reservation is not None:
                tenant.reservation.release()
                tenant.reservation = None
            tenant.set_state(State.SWAPPED_OUT)
        tenant.error = f"swap-in failed: {exc}"

    # ---- leases ---------------------------------------------------------------------------------
    def expire(self) -> None:
        """Kernels whose server stopped reporting: not victims any more, booked for what their
        processes hold by the service's own measure, and forgotten once the process is gone."""
        now = self.clock.monotonic()
        for tenant in [t for t in self.tenants.values() if isinstance(t, RemoteKernelTenant)]:
            if tenant.owner_lost_at is None and now > tenant.lease_until:
                tenant.owner_lost_at = self.clock.time()
                tenant.error = ("its server stopped reporting; booked for what its process holds until it "
                                "reports again or the process ends")
                log.warning("kernel %s of %s: %s", tenant.kernel_id, tenant.user, tenant.error)
                self.notifier.notify()
            if tenant.owner_lost_at is None or tenant.transition.locked():
                continue
            living = self._living(tenant)
            if not living:
                log.info("kernel %s of %s: its processes ended; its booking with them", tenant.kernel_id,
                         tenant.user)
                self.forget(tenant.kernel_id)
            elif tenant.state == State.RUNNING:
                tenant.pids = living  # what is measured: the survivors only (a pid reused is not theirs)
                self._rebook(tenant)

    def start(self) -> None:
        self._watchers = [asyncio.create_task(self._every(self.expire), name="swapserve-kernel-leases"),
                          asyncio.create_task(self._every(self.swap_out_due), name="swapserve-kernel-idle")]

    async def _every(self, step: Callable[[], Any]) -> None:
        while True:
            try:
                result = step()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # keep watching: one bad sweep must not end kernel tenancy
                log.exception("kernel sweep failed")
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        """Shutdown: the owners keep their kernels (and restore them when a cell comes; nothing of
        theirs is touched here); the books and the channels end."""
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.owners.close_all()
        for kernel_id in list(self.tenants):
            self.forget(kernel_id)


def steps_of(answer: OwnerAnswer) -> SwapSteps:
    """The owner's timed steps, as the swap record takes them."""
    steps = SwapSteps()
    steps.timings = list(answer.steps)
    return steps


def visible(pid: int, start: str) -> bool:
    """Whether ``pid`` is, here, the live process that started at ``start`` (not one that has ended
    and waits for its parent, not another that got the same number, not one of another namespace)."""
    fields = procfs.stat_fields(pid)
    return bool(fields) and len(fields) > 19 and fields[0] not in ("Z", "X") and fields[19] == start  # type: ignore[index]


def process_of(pid: int, user: str) -> bool:
    """Whether process ``pid`` is visibly one of ``user``'s: started by a JupyterHub server of theirs
    (``JUPYTERHUB_USER`` in its environment), or, where the service may not read that, running as
    the user's system account. Unknown counts as no."""
    env = procfs.environ(pid)
    if env:
        return env.get("JUPYTERHUB_USER") == user
    uid = procfs.owner_uid(pid)
    with contextlib.suppress(KeyError):
        return uid is not None and uid == pwd.getpwnam(user).pw_uid
    return False

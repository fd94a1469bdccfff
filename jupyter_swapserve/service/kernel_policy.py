"""Which notebook kernels leave the GPU: pure functions over plain views of kernel tenants.

A kernel that holds GPU memory is a tenant like a model. It is ranked against models by the same
preemption policy (:func:`.policy.choose_victims`) through :func:`kernel_snapshot`: a resident,
idle kernel looks like an engine with nothing queued, last used at its last execution. A busy
kernel (a cell is running) is never a victim: its snapshot is ``busy``, which the policy never
evicts. Kernels and models share one vocabulary of states (:mod:`.states`): a kernel holding its
GPU memory is ``running`` (shown to users as "resident"). Idle swap-out, a user's "release" and
the per-user limit on kernel GPU memory are decided here too; the swapping itself is :mod:`.kernels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .policy import BackendSnapshot
from .states import State


@dataclass(frozen=True)
class KernelView:
    name: str
    user: str
    device: int
    state: State  # running (resident) | swapping_out | swapped_out | swapping_in
    busy: bool
    pinned: bool
    gib: float
    #: time.time() of the kernel's last execution (or its start)
    last_execution: float
    #: the user asked (%gpu release) to swap it out as soon as it is idle
    release_requested: bool = False
    #: whoever swaps it can be asked now: always for a kernel of this server; for a kernel of a
    #: user's server (service/remote_kernels.py), while that server reports, holds its command
    #: channel open and answered its last command in time. A kernel nobody can move is never a victim.
    owner_answers: bool = True


def kernel_snapshot(k: KernelView) -> BackendSnapshot:
    """The kernel as the preemption policy sees it: a victim only while resident, idle and movable
    (its owner answers)."""
    return BackendSnapshot(
        name=k.name, device=k.device, state=k.state, memory_gib=k.gib, queued=0, in_flight=1 if k.busy else 0,
        last_used=k.last_execution, pinned=k.pinned, busy=k.busy or not k.owner_answers,
    )


def swappable(k: KernelView) -> bool:
    return k.state == State.RUNNING and not k.busy and not k.pinned and k.gib > 0 and k.owner_answers


def due_for_swap_out(kernels: Sequence[KernelView], now: float, idle_timeout: float | None) -> list[str]:
    """Kernels to swap out now, least recently used first: those whose user asked for it, and
    (``idle_timeout`` set) those idle for that long. Busy and pinned kernels never."""
    due = [k for k in kernels if swappable(k) and (
        k.release_requested or (idle_timeout is not None and now - k.last_execution >= idle_timeout))]
    return [k.name for k in sorted(due, key=lambda k: (k.last_execution, k.name))]


def over_user_limit(kernels: Sequence[KernelView], user: str, limit_gib: float | None,
                    keep: str | None = None) -> tuple[list[str], bool]:
    """The user's idle kernels to swap out, least recently used first, so that their resident
    kernels hold at most ``limit_gib`` (``keep``: a kernel about to come back, counted and never
    chosen). Returns the kernels and whether that is enough (busy and pinned ones cannot go)."""
    if limit_gib is None:
        return [], True
    mine = [k for k in kernels if k.user == user and (k.state in (State.RUNNING, State.SWAPPING_IN) or k.name == keep)]
    held = sum(k.gib for k in mine)
    chosen: list[str] = []
    for k in sorted((k for k in mine if k.name != keep and swappable(k)), key=lambda k: (k.last_execution, k.name)):
        if held <= limit_gib + 1e-9:
            break
        chosen.append(k.name)
        held -= k.gib
    return chosen, held <= limit_gib + 1e-9


def may_pin(kernels: Sequence[KernelView], user: str, name: str, pin_limit_gib: float | None) -> bool:
    """Pinning keeps a kernel on the GPU for good: allowed while the user's pinned kernels, this one
    included, stay within ``pin_limit_gib`` (None: no limit; 0: the user may not pin)."""
    if pin_limit_gib is None:
        return True
    pinned = sum(k.gib for k in kernels if k.user == user and (k.pinned or k.name == name))
    return pinned <= pin_limit_gib + 1e-9

"""Demand-aware preemption: a pure function from backend snapshots to an ordered victim list.

Among running engines on the device, prefer the fewest queued + in-flight requests; ties go to
the engine whose waiting requests have the lower quota priority, then to the least recently
used. Never a pinned engine, never the requester, and never an engine that still has waiting
requests and has not yet held the device for its residency quantum: a swap costs seconds on a
GPU, so a model swapped in for a queue serves it for a while (batched, with the engine's real
concurrency) before it can be pushed out again. Without that, two busy models evict each other
after every request, and a contended node spends its time swapping (one swap per request).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .states import State


@dataclass(frozen=True)
class BackendSnapshot:
    name: str
    device: int
    state: State
    memory_gib: float
    queued: int
    in_flight: int
    last_used: float
    pinned: bool = False
    served_since_swap_in: bool = True
    #: the highest quota priority among the engine's waiting requests (0 when none wait)
    priority: float = 0.0
    #: seconds since the engine last came onto the device (swap-in or start)
    resident_for: float = float("inf")
    #: how long it keeps the device while it has waiting requests (see residency_quantum)
    quantum: float = 0.0
    #: working now and never to be interrupted (a kernel running a cell): not a victim
    busy: bool = False


@dataclass(frozen=True)
class VictimPlan:
    victims: tuple[str, ...]
    #: whether evicting every victim frees enough for the request
    sufficient: bool


def residency_quantum(last_swap_in_s: float | None, last_swap_out_s: float | None, multiple: float,
                      floor_s: float, cap_s: float = 300.0) -> float:
    """How long a model swapped in for waiting requests keeps the device while requests wait: a
    multiple of what its swap costs (out and back in), at least ``floor_s``, at most ``cap_s``.
    Longer amortises each swap over more requests (throughput); shorter lets another model's
    waiting requests in sooner (latency)."""
    cost = (last_swap_in_s or 0.0) + (last_swap_out_s or 0.0)
    return max(0.0, min(cap_s, max(floor_s, multiple * cost)))


def protected(s: BackendSnapshot) -> bool:
    """Still owed its quantum: it has requests waiting or being served, and has not served one or
    not held the device long. Being served counts: with the engine's real concurrency a whole
    batch is in flight and nothing queued, and pushing it out then only drains the batch and
    brings it back for the requests that arrive a moment later (seen on the H100: 3 swaps for
    a burst that needs 2)."""
    return s.queued + s.in_flight > 0 and (not s.served_since_swap_in or s.resident_for < s.quantum)


def evictable(s: BackendSnapshot, device: int, requester: str) -> bool:
    return (
        s.device == device
        and s.state == State.RUNNING
        and not s.busy
        and not s.pinned
        and s.name != requester
        and not protected(s)
    )


def choose_victims(
    backends: Sequence[BackendSnapshot], device: int, need_gib: float, free_gib: float, requester: str
) -> VictimPlan:
    """The shortest prefix of the preference order that frees ``need_gib`` beyond ``free_gib``.

    When even all candidates are not enough, every candidate is returned with
    ``sufficient=False``: the caller decides whether to evict them or to wait.
    """
    if free_gib >= need_gib:
        return VictimPlan((), True)
    ordered = sorted(
        (s for s in backends if evictable(s, device, requester)),
        key=lambda s: (s.queued + s.in_flight, s.priority, s.last_used, s.name),
    )
    victims: list[str] = []
    freed = free_gib
    for s in ordered:
        victims.append(s.name)
        freed += s.memory_gib
        if freed >= need_gib:
            return VictimPlan(tuple(victims), True)
    return VictimPlan(tuple(victims), False)


def prefetch_victims(backends: Sequence[BackendSnapshot], device: int, need_gib: float, free_gib: float,
                     requester: str) -> VictimPlan:
    """For an intent hint (prefetch): only idle engines may make room, never one that is serving or
    has requests waiting. ``sufficient=False`` means the hint is declined."""
    idle = [s for s in backends if s.queued == 0 and s.in_flight == 0]
    return choose_victims(idle, device, need_gib, free_gib, requester)


@dataclass(frozen=True)
class ResidualSnapshot:
    """A sleeping engine's residual kept on the GPU (CUDA context, allocator pools)."""

    name: str
    gib: float
    last_used: float
    residual: str  # the model's `residual` option: keep | auto


def keeps_residual(option: str, room: bool) -> bool:
    """After the sleep hook: keep the residual on the GPU (swap-in skips the driver restore)?
    keep: always; auto: while nobody waits for memory on the device; checkpoint: never."""
    return option == "keep" or (option == "auto" and room)


def movable_residuals(kept: Sequence[ResidualSnapshot], short_gib: float) -> tuple[str, ...]:
    """Which kept residuals to checkpoint, least recently used first, to find ``short_gib`` more:
    cheaper than evicting an engine that serves (a residual is ~1 GiB of state nobody uses now).
    Only `residual: auto` ones; the shortest such prefix, or all of them when that is not enough."""
    if short_gib <= 0:
        return ()
    chosen: list[str] = []
    found = 0.0
    for r in sorted((r for r in kept if r.residual == "auto"), key=lambda r: (r.last_used, r.name)):
        chosen.append(r.name)
        found += r.gib
        if found >= short_gib:
            break
    return tuple(chosen)


def residuals_to_restore(checkpointed: Sequence[ResidualSnapshot], free_gib: float, anyone_waiting: bool
                         ) -> tuple[str, ...]:
    """Which checkpointed residuals (`residual: auto`) to bring back to the GPU while it has room, most
    recently used first (the likeliest to be asked for next): a swap-in that finds its residual on the
    GPU skips the driver restore (~0.75 s for a 1 GiB residual). Residuals moved out to make room
    (an unmeasured start takes the whole device) come back once the room is there again; never while
    anyone waits for memory on the device."""
    if anyone_waiting:
        return ()
    chosen: list[str] = []
    room = free_gib
    for r in sorted((r for r in checkpointed if r.residual == "auto"), key=lambda r: (-r.last_used, r.name)):
        if 0 < r.gib <= room + 1e-9:
            chosen.append(r.name)
            room -= r.gib
    return tuple(chosen)

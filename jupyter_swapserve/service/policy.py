"""Demand-aware preemption: a pure function from backend snapshots to an ordered victim list.

Among running engines on the device, prefer the fewest queued + in-flight requests; ties go to
the engine whose waiting requests have the lower quota priority, then to the least recently
used. Never a pinned engine, never the requester, and never an engine that was swapped in for
waiting requests and has not yet served one of them (otherwise two busy models can evict each
other forever without either making progress).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BackendSnapshot:
    name: str
    device: int
    state: str
    memory_gib: float
    queued: int
    in_flight: int
    last_used: float
    pinned: bool = False
    served_since_swap_in: bool = True
    #: the highest quota priority among the engine's waiting requests (0 when none wait)
    priority: float = 0.0


@dataclass(frozen=True)
class VictimPlan:
    victims: tuple[str, ...]
    #: whether evicting every victim frees enough for the request
    sufficient: bool


def evictable(s: BackendSnapshot, device: int, requester: str) -> bool:
    return (
        s.device == device
        and s.state == "running"
        and not s.pinned
        and s.name != requester
        and (s.served_since_swap_in or s.queued == 0)
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

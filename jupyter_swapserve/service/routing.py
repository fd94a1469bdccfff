"""Which node serves a request for a model that several nodes offer: a pure function of the nodes'
own status documents (``GET /swapserve/api/status``, as their event streams last reported them).

In this order, the first that applies:

1. a node where the model is **running** (or swapping in: it is on its way), shortest queue first;
2. a node where it is **swapped out and fits** in the free memory of its device without evicting
   anything, shortest queue first;
3. any other node that serves it, **cheapest eviction** first — the seconds its victims take to swap
   out, the victims chosen by the node's own preemption policy — then the shortest queue; a model
   still starting, or one that cannot get the memory even by evicting, comes last here;
4. a node where it **failed** or was stopped, only when no other node has it: its error is then
   the answer the user gets.

A node that is down is never chosen. The invariant: the choice only ever goes to a node whose last
status lists the model, and a lower rank is never chosen while a higher one is available.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .policy import BackendSnapshot, choose_victims

#: what a swap-out is assumed to cost when a node has not measured one for a model yet
DEFAULT_SWAP_OUT_SECONDS = 1.0
RUNNING = ("running", "swapping_in")
BROKEN = ("failed", "stopped")


@dataclass(frozen=True)
class NodeState:
    name: str
    up: bool
    status: Mapping[str, Any] | None  # the node's last status document, None before the first


@dataclass(frozen=True)
class Choice:
    node: str
    rank: int  # 1: running, 2: fits, 3: evicts or waits, 4: failed
    reason: str
    eviction_seconds: float = 0.0
    queue: int = 0


def model_entry(status: Mapping[str, Any] | None, model: str) -> Mapping[str, Any] | None:
    for entry in (status or {}).get("models", ()):
        if entry.get("name") == model:
            return entry
    return None


def offered_by(model: str, nodes: Sequence[NodeState]) -> list[str]:
    """Every node whose last status lists the model, up or not."""
    return [n.name for n in nodes if model_entry(n.status, model) is not None]


def _queue(entry: Mapping[str, Any]) -> int:
    return int(entry.get("queue_depth") or 0) + int(entry.get("in_flight") or 0)


def _device(status: Mapping[str, Any], index: int) -> Mapping[str, Any] | None:
    return next((d for d in status.get("devices", ()) if d.get("index") == index), None)


def eviction(status: Mapping[str, Any], entry: Mapping[str, Any]) -> tuple[bool, float]:
    """(fits without evicting, seconds of swap-outs to make room) for a model not on its device."""
    device = _device(status, int(entry.get("device") or 0))
    if device is None:
        return False, math.inf
    need = max(0.0, float(entry.get("memory_gib") or 0.0) - float(entry.get("reserved_gib") or 0.0))
    free = float(device.get("free_gib") or 0.0)
    if need <= free + 1e-9:
        return True, 0.0
    others = [
        BackendSnapshot(name=m["name"], device=int(m.get("device") or 0), state=m.get("state", ""),
                        memory_gib=float(m.get("reserved_gib") or 0.0), queued=int(m.get("queue_depth") or 0),
                        in_flight=int(m.get("in_flight") or 0), last_used=float(m.get("last_used") or 0.0),
                        pinned=bool(m.get("pinned")))
        for m in status.get("models", ()) if m is not entry
    ]
    plan = choose_victims(others, int(entry.get("device") or 0), need, free, str(entry.get("name")))
    if not plan.sufficient:
        return False, math.inf
    by_name = {m["name"]: m for m in status.get("models", ())}
    return False, sum(float(by_name[v].get("last_swap_out_seconds") or DEFAULT_SWAP_OUT_SECONDS)
                      for v in plan.victims)


def assess(node: NodeState, model: str) -> Choice | None:
    """Where ``node`` stands for ``model``; None when it is down or does not serve it."""
    entry = model_entry(node.status, model) if node.up else None
    if entry is None or node.status is None:
        return None
    state, queue = entry.get("state", ""), _queue(entry)
    if state in RUNNING:
        return Choice(node.name, 1, state, 0.0, queue)
    if state in BROKEN:
        return Choice(node.name, 4, f"{state}: {entry.get('error') or 'no reason given'}", math.inf, queue)
    if state == "swapped_out":
        fits, seconds = eviction(node.status, entry)
        if fits:
            return Choice(node.name, 2, "swapped out, fits without evicting", 0.0, queue)
        reason = "swapped out, waits for memory" if math.isinf(seconds) else f"swapped out, evicts {seconds:.2g} s"
        return Choice(node.name, 3, reason, seconds, queue)
    return Choice(node.name, 3, state, math.inf, queue)  # starting, swapping out: it will take a while


def ranked(model: str, nodes: Sequence[NodeState]) -> list[Choice]:
    """Every node that can take a request for ``model``, best first (ties: the nodes' order)."""
    choices = [(c, i) for i, n in enumerate(nodes) if (c := assess(n, model)) is not None]
    choices.sort(key=lambda ci: (ci[0].rank, ci[0].eviction_seconds, ci[0].queue, ci[1]))
    return [c for c, _ in choices]


def choose_node(model: str, nodes: Sequence[NodeState]) -> Choice | None:
    """The node for a request for ``model``, or None when no node that is up serves it."""
    best = ranked(model, nodes)
    return best[0] if best else None

"""One state machine for every tenant of a device (models and notebook kernels alike).

    stopped → starting → running ⇄ swapping_out → swapped_out ⇄ swapping_in → running
    any state → failed (the engine died or a swap could not be undone) and → stopped (shut down)

Invariant: a tenant's state only ever moves along :data:`TRANSITIONS` (llama-swap's
``isValidTransition``); any other move is a bug, logged and raised as :class:`InvalidTransition`
before anything observes it. A request is forwarded only while its model is ``running``.

:class:`Tenant` also keeps the books every tenant shares, written once here: what the end of a
swap-in and of a swap-out changes (counts, durations, what stays checkpointed).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from enum import Enum

log = logging.getLogger(__name__)


class State(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    SWAPPING_OUT = "swapping_out"
    SWAPPED_OUT = "swapped_out"
    SWAPPING_IN = "swapping_in"
    FAILED = "failed"


_ALWAYS = frozenset({State.FAILED, State.STOPPED})

#: the moves a tenant may make, from each state
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}) | _ALWAYS,
    State.STARTING: frozenset({State.RUNNING}) | _ALWAYS,
    # a running engine also fails when it exits; a swap-out may be refused before it starts
    State.RUNNING: frozenset({State.SWAPPING_OUT}) | _ALWAYS,
    # a swap-out that is unwound leaves the tenant running, as it was
    State.SWAPPING_OUT: frozenset({State.SWAPPED_OUT, State.RUNNING}) | _ALWAYS,
    State.SWAPPED_OUT: frozenset({State.SWAPPING_IN}) | _ALWAYS,
    # a swap-in that is unwound (or cancelled) leaves the tenant swapped out, as it was
    State.SWAPPING_IN: frozenset({State.RUNNING, State.SWAPPED_OUT}) | _ALWAYS,
    # failed again: a start that failed after the engine's exit had already been reported
    State.FAILED: frozenset({State.STARTING}) | _ALWAYS,
}

#: how a kernel's states read in its status (a kernel that holds its GPU memory is "resident")
KERNEL_LABELS = {State.RUNNING: "resident"}


class InvalidTransition(RuntimeError):
    """A tenant was asked to move where the state machine has no edge: a bug in the caller."""


def check_transition(name: str, old: State, new: State) -> None:
    if new not in TRANSITIONS[old]:
        log.error("%s: invalid state transition %s → %s", name, old.value, new.value)
        raise InvalidTransition(f"{name}: {old.value} → {new.value} is not a valid transition")


class Tenant:
    """The state and swap books of a tenant; mixed into the dataclasses of models
    (:class:`.backend.Backend`) and kernels (:class:`.kernels.KernelTenant`), which declare the
    fields. ``on_change`` tells the service's watchers (status, waiters for memory)."""

    name: str
    state: State
    error: str | None
    checkpointed_pids: list[int]
    swaps_in: int
    swaps_out: int
    last_swap_in_seconds: float | None
    last_swap_out_seconds: float | None
    swap_in_history: deque[tuple[float, float]]
    on_change: Callable[[], None]

    def set_state(self, state: State, error: str | None = None) -> None:
        """Move along the state machine (:data:`TRANSITIONS`). Failing records why; running again
        clears the last error."""
        check_transition(self.name, self.state, state)
        self.state = state
        if state == State.FAILED:
            self.error = error
        elif state == State.RUNNING:
            self.error = None
        self.on_change()

    def swapped_in(self, seconds: float) -> None:
        """The books at the end of every swap-in: nothing is checkpointed any more."""
        self.checkpointed_pids = []
        self.last_swap_in_seconds = seconds
        self.swap_in_history.append((time.time(), seconds))
        self.swaps_in += 1

    def swapped_out(self, seconds: float, checkpointed_pids: list[int]) -> None:
        """The books at the end of every swap-out: which processes the driver now holds on the host."""
        self.checkpointed_pids = checkpointed_pids
        self.last_swap_out_seconds = seconds
        self.swaps_out += 1

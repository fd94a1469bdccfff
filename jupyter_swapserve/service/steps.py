"""Swap steps: run in order, timed, undone in reverse when one fails; the driver's step pairs; the
record of every swap.

Invariant: when :meth:`SwapSteps.run` returns or raises, no step is half done: every step ran to
its end and is either kept (success) or undone (failure, cancellation), and ``steps.unwound``
says whether every undo worked. A failure raises :class:`SwapStepError`; a cancellation is
re-raised as itself, after the step in progress ended and the unwind, so a cancelled task stays
cancelled (callers give back what they hold on the way out, whatever the way).

The driver's pairs, each with its undo (design.md §2: order matters):

    swap-out: lock (undo: unlock) → checkpoint (undo: restore) → [freeze, by the runtime]
    swap-in:  [thaw] → restore (undo: checkpoint) → unlock (undo: lock)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..gpu.checkpoint import run_guarded

log = logging.getLogger(__name__)


@dataclass
class StepTiming:
    step: str
    seconds: float
    ok: bool = True


class SwapStepError(RuntimeError):
    """A step failed (not cancelled): ``cause`` is why, ``unwound`` whether every undo worked."""

    def __init__(self, step: str, cause: BaseException, unwound: bool) -> None:
        self.step, self.cause, self.unwound = step, cause, unwound
        super().__init__(f"{step} failed: {cause}" + ("" if unwound else " (unwinding failed too)"))


class SwapSteps:
    """Runs swap steps in order, timing each; on failure or cancellation undoes the completed ones in
    reverse."""

    def __init__(self) -> None:
        self.timings: list[StepTiming] = []
        self._undo: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
        #: False once an undo failed: the tenant is in neither its old nor its new state
        self.unwound = True

    async def run(self, step: str, action: Callable[[], Awaitable[Any]],
                  undo: Callable[[], Awaitable[Any]] | None = None, undo_if_failed: bool = False) -> None:
        """Run one step. ``undo_if_failed``: the step may have half-happened when it fails, and its
        undo is safe either way (thaw after a failed freeze, wake after a failed sleep).

        A cancellation (a client gone, shutdown) never cuts a step in half: the step in progress
        runs to its end (every step is bounded: driver calls by their timeouts, hooks by the HTTP
        client's), then every completed step is undone, and the cancellation is raised again."""
        t0 = time.perf_counter()
        work = asyncio.ensure_future(action())
        cancellation = await _to_its_end(work)
        failure = _failure(work)
        self.timings.append(StepTiming(step, time.perf_counter() - t0, ok=failure is None))
        if undo is not None and (failure is None or undo_if_failed):
            self._undo.append((step, undo))
        if failure is None and cancellation is None:
            return
        unwound = await self.unwind()
        if cancellation is not None:
            raise cancellation  # the cancellation itself, the steps undone
        assert failure is not None
        raise SwapStepError(step, failure, unwound) from failure

    async def unwind(self) -> bool:
        """Undo the completed steps, last first, each to its end (a cancellation meanwhile is raised
        once all are undone). True when every undo worked."""
        ok = True
        cancellation: asyncio.CancelledError | None = None
        while self._undo:
            step, undo = self._undo.pop()
            t0 = time.perf_counter()
            work = asyncio.ensure_future(undo())
            cancellation = await _to_its_end(work) or cancellation
            failed = _failure(work) is not None
            ok = ok and not failed
            self.timings.append(StepTiming(f"undo {step}", time.perf_counter() - t0, ok=not failed))
        self.unwound = self.unwound and ok
        if cancellation is not None:
            raise cancellation
        return ok

    @property
    def total(self) -> float:
        return sum(t.seconds for t in self.timings)


async def _to_its_end(work: asyncio.Future[Any]) -> asyncio.CancelledError | None:
    """Wait until ``work`` is done, even when this task is cancelled meanwhile (and again). Returns
    the cancellation of this task, if there was one."""
    cancellation: asyncio.CancelledError | None = None
    while True:
        try:
            await asyncio.shield(work)
            return cancellation
        except asyncio.CancelledError as exc:
            if work.cancelled():  # the step itself was cancelled, not this task: its failure
                return cancellation
            if work.done():
                return cancellation or exc
            cancellation = cancellation or exc
        except Exception:  # the step failed: _failure() tells
            return cancellation


def _failure(work: asyncio.Future[Any]) -> BaseException | None:
    if work.cancelled():
        return asyncio.CancelledError("the step was cancelled")
    return work.exception()


class Checkpointer(Protocol):
    """The CUDA checkpoint driver (gpu/checkpoint.py), or its no-op stand-in without a GPU."""

    kind: str
    available: bool

    def lock(self, pid: int, timeout_ms: int = ...) -> None: ...
    def checkpoint(self, pid: int) -> None: ...
    def restore(self, pid: int) -> None: ...
    def unlock(self, pid: int) -> None: ...


class DriverSteps:
    """The checkpoint driver's calls as swap steps, each in a thread and never awaited for longer
    than it can take: a hung call (restore of a frozen process) fails its step, not the service."""

    def __init__(self, checkpointer: Checkpointer, lock_timeout_ms: int = 10_000,
                 driver_timeout_s: float = 300.0) -> None:
        self.checkpointer = checkpointer
        self.lock_timeout_ms = lock_timeout_ms
        # checkpoint copies at ~1.5 GB/s and restore at ~4 GB/s (design.md §2): 80 GB take < 60 s
        self.driver_timeout_s = driver_timeout_s

    @property
    def available(self) -> bool:
        """Whether GPU memory can be moved to the host at all (a driver with the checkpoint API)."""
        return bool(getattr(self.checkpointer, "available", False))

    async def call(self, step: str, pid: int) -> None:
        """One driver call (lock, checkpoint, restore or unlock) on one process."""
        ckpt = self.checkpointer
        if step == "lock":
            await run_guarded(step, pid, ckpt.lock, pid, self.lock_timeout_ms,
                              timeout=self.lock_timeout_ms / 1000 + 30)
            return
        call = {"checkpoint": ckpt.checkpoint, "restore": ckpt.restore, "unlock": ckpt.unlock}[step]
        await run_guarded(step, pid, call, pid, timeout=self.driver_timeout_s)

    async def checkpoint(self, steps: SwapSteps, pids: list[int]) -> None:
        """lock every process, then checkpoint each (its GPU memory to the host); undone in reverse."""
        for pid in pids:
            await steps.run("lock", lambda p=pid: self.call("lock", p), undo=lambda p=pid: self.call("unlock", p))
        for pid in pids:
            await steps.run("checkpoint", lambda p=pid: self.call("checkpoint", p),
                            undo=lambda p=pid: self.call("restore", p))

    async def restore(self, steps: SwapSteps, pids: list[int]) -> None:
        """restore every checkpointed process, then unlock each (never on a frozen one: it hangs)."""
        for pid in pids:
            await steps.run("restore", lambda p=pid: self.call("restore", p),
                            undo=lambda p=pid: self.call("checkpoint", p))
        for pid in pids:
            await steps.run("unlock", lambda p=pid: self.call("unlock", p), undo=lambda p=pid: self.call("lock", p))


class SwapObserver(Protocol):
    """Told of every swap and engine failure: metrics, the event log."""

    def swap_recorded(self, model: str, what: str, timings: list[StepTiming]) -> None: ...
    def engine_failed(self, model: str, reason: str) -> None: ...


class SwapRecord:
    """Where every swap of every tenant is recorded, once: its step timings on the tenant, the
    observers told, one log line."""

    def __init__(self, observers: list[SwapObserver] | None = None) -> None:
        self.observers: list[SwapObserver] = observers if observers is not None else []

    def swap(self, tenant: Any, what: str, steps: SwapSteps) -> None:
        """``tenant``: anything with a ``name`` and ``last_steps`` (a model or a kernel)."""
        tenant.last_steps = steps.timings
        for observer in self.observers:
            observer.swap_recorded(tenant.name, what, steps.timings)
        log.info("%s %s: %s", tenant.name, what,
                 ", ".join(f"{t.step} {t.seconds * 1000:.1f} ms{'' if t.ok else ' FAILED'}" for t in steps.timings))

    def failure(self, name: str, reason: str) -> None:
        log.error("model %s failed: %s", name, reason)  # every failure, with its reason, in the server log
        for observer in self.observers:
            observer.engine_failed(name, reason)

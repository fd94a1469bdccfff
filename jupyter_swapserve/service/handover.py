"""Memory handed over while a victim's sleep hook is still running.

A sleep hook frees an engine's memory in stages: the reference engine drops its KV cache (discarded,
not copied) at once and then copies its weights out; other engines free per buffer or per chunk.
Waiting for the hook to return puts the victim's whole device→host copy in front of the
requester's wake. Instead, while the hook runs, the victim's reservation shrinks to what the
engine's processes still hold (measured by NVML, plus a margin for what may still be in flight
between two samples). A requester waiting for memory is granted as soon as the books allow, and its
host→device copy overlaps the victim's device→host one: PCIe is full duplex.

The reservation only ever shrinks here, and never below what the engine was last seen to hold, so
the books stay exact at every instant (reserved ≤ capacity, and no engine holds more than it has
reserved). Growing it back when the sleep fails is the caller's undo.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

#: added to every sample: a buffer may be freed between two samples, never allocated (the hook only
#: releases), but NVML's per-process figure lags the driver by a little
MARGIN_GIB = 0.25
#: how often the engine's memory is sampled while its hook runs (one NVML query, in a thread)
INTERVAL_S = 0.01


class Shrinkable(Protocol):
    gib: float
    released: bool

    def resize(self, gib: float) -> None: ...


@dataclass
class HandoverReport:
    """What the hook gave up while it ran (for the swap's log line and the benchmark)."""

    handed_gib: float = 0.0
    #: seconds after the hook started when memory was first handed over (None: nothing was)
    first_after_s: float | None = None
    samples: int = 0

    def describe(self) -> str:
        if self.first_after_s is None:
            return f"nothing handed over during the sleep ({self.samples} samples)"
        return (f"{self.handed_gib:.2f} GiB handed over during the sleep, the first "
                f"{self.first_after_s * 1000:.0f} ms after it began")


async def run_handing_over(hook: Callable[[], Awaitable[T]], held_gib: Callable[[], float | None],
                           reservation: Shrinkable, *, margin_gib: float = MARGIN_GIB,
                           interval_s: float = INTERVAL_S) -> tuple[T, HandoverReport]:
    """Run ``hook`` (the sleep); while it runs, shrink ``reservation`` to ``held_gib() + margin``
    whenever that is smaller. ``held_gib`` is blocking (NVML) and runs in a thread; None means it
    could not be measured this time (nothing changes). Cancelling this cancels the hook."""
    report = HandoverReport()
    start = reservation.gib
    t0 = time.perf_counter()
    task: asyncio.Future[T] = asyncio.ensure_future(hook())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=interval_s)
            if task.done():
                break
            held = await asyncio.to_thread(held_gib)
            report.samples += 1
            if held is None or reservation.released:
                continue
            target = max(0.0, held + margin_gib)
            if target < reservation.gib - 1e-9:
                reservation.resize(target)
                if report.first_after_s is None:
                    report.first_after_s = time.perf_counter() - t0
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    report.handed_gib = max(0.0, start - reservation.gib) if not reservation.released else 0.0
    result: Any = task.result()  # the hook's own error, if it failed
    return result, report

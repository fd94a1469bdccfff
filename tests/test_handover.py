"""Memory handed over while a sleep hook runs (service/handover.py), on a real reservation manager.

The engine here is a coroutine that frees its memory in stages, as the reference engine's sleep
does (the KV cache at once, then the weights after their copy); what NVML would report is the
``held`` value it lowers. The GPU test (tests/gpu/test_gpu_contention.py) runs the real thing."""

from __future__ import annotations

import asyncio

import pytest

from jupyter_swapserve.service.handover import run_handing_over
from jupyter_swapserve.service.reservations import EPSILON, Reservation, ReservationManager


class StagedSleep:
    """An engine holding ``held`` GiB that frees ``stages`` [(delay s, GiB freed)] in turn."""

    def __init__(self, held: float, stages: list[tuple[float, float]], fail: bool = False) -> None:
        self.held = held
        self.stages = stages
        self.fail = fail
        self.finished = False
        self.cancelled = False

    async def __call__(self) -> dict[str, float]:
        try:
            for delay, freed in self.stages:
                await asyncio.sleep(delay)
                self.held -= freed
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.fail:
            raise RuntimeError("sleep hook answered 500")
        self.finished = True
        return {"held": self.held}


class BooksSampler:
    """Checks, every millisecond, that the books are exact: granted ≤ capacity, and the victim's
    reservation never below what its engine holds."""

    def __init__(self, manager: ReservationManager, victim: Reservation, engine: StagedSleep) -> None:
        self.manager, self.victim, self.engine = manager, victim, engine
        self.samples = 0
        self.violations: list[str] = []

    async def run(self) -> None:
        while True:
            self.samples += 1
            if self.manager.granted_gib > self.manager.capacity_gib + EPSILON:
                self.violations.append(f"granted {self.manager.granted_gib} > capacity")
            gib = self.victim.gib
            if not self.victim.released and gib + EPSILON < self.engine.held:
                self.violations.append(f"victim reserved {gib} < held {self.engine.held}")
            await asyncio.sleep(0.001)


async def test_a_waiter_is_granted_while_the_sleep_still_runs() -> None:
    # 80 GiB: the victim holds 30 (15 weights + 14 KV + 1 residual), another engine 30; the
    # requester needs 28 and 20 are free: the KV cache alone covers the rest
    manager = ReservationManager(0, 80)
    victim = manager.try_acquire("victim", 30)
    assert manager.try_acquire("other", 30) is not None and victim is not None
    engine = StagedSleep(30, [(0.05, 14), (0.3, 15), (0.05, 0)])  # the last: emptying caches
    requester = asyncio.create_task(manager.acquire("requester", 28))
    books = BooksSampler(manager, victim, engine)
    sampler = asyncio.create_task(books.run())
    granted_while_sleeping: list[bool] = []
    held_when_granted: list[float] = []

    def on_grant(_: object) -> None:
        granted_while_sleeping.append(not engine.finished)
        held_when_granted.append(engine.held)

    requester.add_done_callback(on_grant)

    result, report = await run_handing_over(engine, lambda: engine.held, victim, margin_gib=0.25,
                                            interval_s=0.005)
    sampler.cancel()
    await asyncio.gather(sampler, return_exceptions=True)

    assert result == {"held": 1}
    assert requester.done() and granted_while_sleeping == [True]
    assert (await requester).gib == 28
    # handed over down to what the engine holds plus the margin, never below it
    assert victim.gib == pytest.approx(1.25)
    assert report.handed_gib == pytest.approx(28.75)
    # granted on the KV cache alone: the weights (15 GiB) were still on the device, being copied out
    assert held_when_granted == [16]
    assert report.first_after_s is not None  # how soon: bench/contention.py measures it on a GPU
    assert report.samples > 0
    assert books.samples > 0 and books.violations == []
    assert manager.granted_gib <= manager.capacity_gib + EPSILON


async def test_the_reservation_only_shrinks_and_unknown_samples_change_nothing() -> None:
    manager = ReservationManager(0, 40)
    victim = manager.try_acquire("victim", 10)
    assert victim is not None
    readings = iter([None, 12.0, None, 9.0, 15.0, 4.0])
    seen: list[float] = []

    def held() -> float | None:
        value = next(readings, 4.0)
        if value is not None:
            seen.append(victim.gib)
        return value

    async def hook() -> str:
        await asyncio.sleep(0.15)
        return "slept"

    result, report = await run_handing_over(hook, held, victim, margin_gib=0.5, interval_s=0.01)
    assert result == "slept"
    # 12 + margin and 15 + margin are above the reservation: ignored; 9 + 0.5 then 4 + 0.5 shrink it
    assert victim.gib == pytest.approx(4.5)
    assert seen[:3] == [10, 10, 9.5]
    assert report.handed_gib == pytest.approx(5.5)


async def test_a_failed_sleep_raises_and_leaves_the_undo_to_the_caller() -> None:
    manager = ReservationManager(0, 40)
    victim = manager.try_acquire("victim", 30)
    assert victim is not None
    engine = StagedSleep(30, [(0.05, 14), (0.1, 0)], fail=True)
    with pytest.raises(RuntimeError, match="answered 500"):
        await run_handing_over(engine, lambda: engine.held, victim, margin_gib=0.25, interval_s=0.005)
    # what was freed before the failure was handed over; the caller's undo grows it back (here it can)
    assert victim.gib == pytest.approx(16.25)
    victim.resize(30)
    assert manager.granted_gib == 30


async def test_growing_back_fails_once_the_memory_was_taken() -> None:
    manager = ReservationManager(0, 40)
    victim = manager.try_acquire("victim", 30)
    assert victim is not None
    engine = StagedSleep(30, [(0.05, 14), (0.1, 0)], fail=True)
    taker = asyncio.create_task(manager.acquire("requester", 20))
    with pytest.raises(RuntimeError):
        await run_handing_over(engine, lambda: engine.held, victim, margin_gib=0.25, interval_s=0.005)
    # bounded: a handover that never gives the memory up must fail here, not hang the suite
    assert (await asyncio.wait_for(taker, 10)).gib == 20
    with pytest.raises(ValueError, match="only"):
        victim.resize(30)  # the engine cannot wake: the scheduler stops it (an unwind that failed)
    assert manager.granted_gib <= manager.capacity_gib + EPSILON


async def test_cancelling_cancels_the_hook() -> None:
    manager = ReservationManager(0, 40)
    victim = manager.try_acquire("victim", 30)
    assert victim is not None
    engine = StagedSleep(30, [(5.0, 29)])
    task = asyncio.create_task(run_handing_over(engine, lambda: engine.held, victim, interval_s=0.005))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.cancelled and not engine.finished
    assert victim.gib == 30

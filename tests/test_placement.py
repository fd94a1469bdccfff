"""Placement (service/placement.py) alone, without a Jupyter server or engines: real reservation
managers, the real policy, and tenant sources whose tenants hold real reservations (a swap-out
gives its reservation back after a moment, as an engine's does). What is checked: memory granted
at once when free; victims evicted by the policy, across sources, until granted; kept residuals
moved before anyone is evicted; a request refused at once when pinned tenants leave too little,
and after a few failed evictions when the only victims will not leave; nothing leaked on any path,
a cancelled requester included."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from jupyter_swapserve.service.background import Background
from jupyter_swapserve.service.events import Notifier
from jupyter_swapserve.service.placement import EngineUnavailable, Placement
from jupyter_swapserve.service.policy import BackendSnapshot, ResidualSnapshot
from jupyter_swapserve.service.reservations import Reservation, ReservationManager
from jupyter_swapserve.service.states import State


@dataclass
class Held:
    """A tenant on device 0: its reservation, when it was last used, whether it can leave."""

    reservation: Reservation | None
    last_used: float
    pinned: bool = False
    refuses: bool = False
    residual: Reservation | None = None
    state: State = State.RUNNING


@dataclass
class Source:
    """A kind of tenant (like models or kernels) that swaps out by giving its reservation back."""

    prefix: str
    tenants: dict[str, Held] = field(default_factory=dict)
    evicted: list[str] = field(default_factory=list)
    residuals_moved: list[str] = field(default_factory=list)

    def owns(self, name: str) -> bool:
        return name in self.tenants

    def label(self, name: str) -> str:
        return f"{self.prefix} '{name}'"

    def snapshots(self) -> list[BackendSnapshot]:
        return [BackendSnapshot(name, 0, t.state, t.reservation.gib if t.reservation else 0.0, 0, 0, t.last_used,
                                pinned=t.pinned) for name, t in self.tenants.items()]

    async def evict(self, name: str, reason: str) -> bool:
        held = self.tenants[name]
        await asyncio.sleep(0.05)  # a swap-out takes a moment
        if held.refuses or held.reservation is None:
            return False
        self.evicted.append(name)
        held.reservation.release()
        held.reservation, held.state = None, State.SWAPPED_OUT
        return True

    def holds(self, name: str) -> bool:
        return self.tenants[name].state == State.RUNNING

    def error(self, name: str) -> str | None:
        return "the lock timed out" if self.tenants[name].refuses else None

    def pinned_gib(self, device: int, requester: str) -> float:
        return sum(t.reservation.gib for n, t in self.tenants.items()
                   if t.pinned and t.reservation is not None and n != requester)

    def residuals(self, device: int) -> list[ResidualSnapshot]:
        return [ResidualSnapshot(n, t.residual.gib, t.last_used, "auto") for n, t in self.tenants.items()
                if t.residual is not None]

    async def checkpoint_residual(self, name: str) -> None:
        held = self.tenants[name]
        assert held.residual is not None
        self.residuals_moved.append(name)
        held.residual.release()
        held.residual = None


async def until(condition: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def setup(capacity: float = 10.0) -> tuple[Placement, ReservationManager, Source, Source]:
    notifier = Notifier()
    manager = ReservationManager(0, capacity, on_change=notifier.notify)
    placement = Placement({0: manager}, notifier, Background())
    models, kernels = Source("model"), Source("kernel")
    placement.register(models)
    placement.register(kernels)
    return placement, manager, models, kernels


def hold(manager: ReservationManager, source: Source, name: str, gib: float, last_used: float, **kw: object) -> Held:
    reservation = manager.try_acquire(name, gib)
    assert reservation is not None
    source.tenants[name] = held = Held(reservation, last_used, **kw)  # type: ignore[arg-type]
    return held


async def test_free_memory_is_granted_at_once_and_nobody_is_evicted() -> None:
    placement, manager, models, _ = setup()
    hold(manager, models, "m", 4.0, last_used=1.0)
    got = await placement.reserve_on("new", 0, 6.0)
    assert got.gib == 6.0 and manager.free_gib == 0.0 and models.evicted == []
    got.release()


async def test_victims_of_both_sources_are_evicted_least_recently_used_first_until_granted() -> None:
    placement, manager, models, kernels = setup()
    hold(manager, models, "m-recent", 4.0, last_used=30.0)
    hold(manager, kernels, "kernel k", 3.0, last_used=10.0)
    hold(manager, models, "m-old", 3.0, last_used=5.0)
    got = await asyncio.wait_for(placement.reserve_on("new", 0, 5.0), 10)
    # the two least recently used leave, one of each kind; the recent model stays
    assert models.evicted == ["m-old"] and kernels.evicted == ["kernel k"]
    assert got.gib == 5.0 and sorted(r.owner for r in manager.granted()) == ["m-recent", "new"]
    assert manager.granted_gib == pytest.approx(9.0)


async def test_kept_residuals_are_moved_before_anyone_is_evicted() -> None:
    placement, manager, models, _ = setup()
    hold(manager, models, "m", 6.0, last_used=1.0)
    sleeping = hold(manager, models, "asleep", 0.0, last_used=0.5, state=State.SWAPPED_OUT)
    sleeping.reservation.release()  # type: ignore[union-attr]
    sleeping.reservation = None
    sleeping.residual = manager.try_acquire("asleep", 2.0)
    got = await asyncio.wait_for(placement.reserve_on("new", 0, 4.0), 10)
    assert models.residuals_moved == ["asleep"] and models.evicted == []
    assert got.gib == 4.0 and manager.granted_gib == pytest.approx(10.0)


async def test_what_pinned_tenants_hold_can_never_be_made_room_for() -> None:
    placement, manager, models, kernels = setup()
    hold(manager, models, "pinned", 6.0, last_used=1.0, pinned=True)
    hold(manager, kernels, "kernel k", 2.0, last_used=1.0)
    with pytest.raises(EngineUnavailable, match=r"new needs 5\.00 GiB but pinned models hold 6\.00"):
        await placement.reserve_on("new", 0, 5.0)
    assert kernels.evicted == [] and manager.waiting() == []


async def test_victims_that_will_not_leave_get_the_request_refused_with_their_reason() -> None:
    placement, manager, models, _ = setup()
    hold(manager, models, "stuck", 8.0, last_used=1.0, refuses=True)
    with pytest.raises(EngineUnavailable, match=r"could not be swapped out \(stuck: the lock timed out\)"):
        await asyncio.wait_for(placement.reserve_on("new", 0, 5.0), 20)
    assert [r.owner for r in manager.granted()] == ["stuck"] and manager.waiting() == []


async def test_a_requester_cancelled_while_its_victim_swaps_out_leaks_nothing_and_the_victim_finishes() -> None:
    placement, manager, models, _ = setup()
    hold(manager, models, "victim", 8.0, last_used=1.0)
    request = asyncio.create_task(placement.reserve_on("new", 0, 5.0))
    await until(lambda: placement.background.tasks)  # the eviction has begun (it takes 50 ms)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    # the swap-out ran in a task of its own and completed; the grant it made was given back
    await asyncio.wait_for(asyncio.gather(*placement.background.tasks), 5)
    assert models.evicted == ["victim"] and manager.granted() == [] and manager.waiting() == []


async def test_a_waiter_queues_until_memory_is_freed_and_keeps_its_place() -> None:
    placement, manager, models, _ = setup()
    held = hold(manager, models, "busy", 8.0, last_used=1.0, state=State.SWAPPING_IN)  # not a victim now
    waiter = asyncio.create_task(placement.wait_for_memory_or_victim(manager, "new", 5.0, replan_s=30))
    await until(lambda: [o for o, _, _ in manager.waiting()] == ["new"])
    held.reservation.release()  # type: ignore[union-attr]
    got = await asyncio.wait_for(waiter, 5)
    assert got is not None and got.owner == "new" and manager.granted() == [got]

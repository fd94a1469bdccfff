"""The reservation manager: grant order, cancellation, release exactly once, capacity invariant."""

from __future__ import annotations

import asyncio
import random

import pytest

from jupyter_swapserve.service.reservations import ReservationManager, ReservationTooLarge


async def test_grants_within_capacity_and_queues_the_rest() -> None:
    m = ReservationManager(0, 10)
    a = m.try_acquire("a", 6)
    assert a is not None and m.free_gib == 4
    assert m.try_acquire("b", 5) is None
    waiter = asyncio.create_task(m.acquire("b", 5))
    await asyncio.sleep(0)
    assert not waiter.done() and m.waiting() == [("b", 5, 0)]
    assert a.release() is True
    b = await asyncio.wait_for(waiter, 1)
    assert b.owner == "b" and m.granted_gib == 5


async def test_release_is_exactly_once() -> None:
    m = ReservationManager(0, 10)
    a = m.try_acquire("a", 4)
    assert a is not None
    assert a.release() is True
    assert a.release() is False
    assert m.granted_gib == 0 and m.free_gib == 10


async def test_priority_then_arrival_order_and_no_overtaking() -> None:
    m = ReservationManager(0, 10)
    hog = m.try_acquire("hog", 10)
    order: list[str] = []

    async def want(name: str, gib: float, prio: int) -> None:
        r = await m.acquire(name, gib, priority=prio)
        order.append(name)
        await asyncio.sleep(0.01)
        r.release()

    tasks = [asyncio.create_task(want("late-big", 8, 1)), asyncio.create_task(want("first", 6, 0)),
             asyncio.create_task(want("second", 6, 0)), asyncio.create_task(want("small", 1, 2))]
    await asyncio.sleep(0)
    # a small later request must not overtake the head of the queue even though it would fit
    assert m.try_acquire("sneaky", 1) is None
    hog.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order[:3] == ["first", "second", "late-big"]
    assert order[3] == "small"
    assert m.granted_gib == 0


async def test_cancelled_waiter_leaves_nothing_and_unblocks_those_behind() -> None:
    m = ReservationManager(0, 10)
    a = m.try_acquire("a", 7)
    big = asyncio.create_task(m.acquire("big", 9))
    small = asyncio.create_task(m.acquire("small", 3))
    await asyncio.sleep(0)
    assert [w[0] for w in m.waiting()] == ["big", "small"]
    big.cancel()
    with pytest.raises(asyncio.CancelledError):
        await big
    r = await asyncio.wait_for(small, 1)  # fits now that the head is gone
    assert m.waiting() == [] and m.granted_gib == 10
    r.release()
    a.release()
    assert m.granted_gib == 0


async def test_wait_for_timeout_releases_a_grant_made_at_the_last_moment() -> None:
    m = ReservationManager(0, 4)
    a = m.try_acquire("a", 4)
    task = asyncio.create_task(m.acquire("b", 4))
    await asyncio.sleep(0)
    a.release()  # grants b ...
    task.cancel()  # ... but b's owner is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await task
    assert m.granted_gib == 0 and m.free_gib == 4


async def test_scoped_reservation_released_on_error() -> None:
    m = ReservationManager(0, 4)
    with pytest.raises(RuntimeError):
        async with m.reserved("x", 3):
            assert m.granted_gib == 3
            raise RuntimeError("boom")
    assert m.granted_gib == 0


async def test_too_large_and_resize() -> None:
    m = ReservationManager(0, 4)
    with pytest.raises(ReservationTooLarge):
        await m.acquire("x", 5)
    r = m.try_acquire("x", 4)
    assert r is not None
    waiter = asyncio.create_task(m.acquire("y", 2))
    await asyncio.sleep(0)
    r.resize(1.5)  # shrinking hands the difference to the queue
    y = await asyncio.wait_for(waiter, 1)
    with pytest.raises(ReservationTooLarge):
        r.resize(3)
    assert m.granted_gib == 3.5
    y.release()
    r.release()


async def test_random_contention_never_exceeds_capacity() -> None:
    m = ReservationManager(0, 10)
    peak = 0.0
    rng = random.Random(7)

    def check() -> None:
        nonlocal peak
        peak = max(peak, m.granted_gib)
        assert m.granted_gib <= m.capacity_gib + 1e-9

    m._on_change = check

    async def worker(i: int) -> None:
        for _ in range(20):
            gib = rng.choice([1, 2.5, 4, 6])
            try:
                async with asyncio.timeout(rng.choice([0.001, 0.05, 1])):
                    r = await m.acquire(f"w{i}", gib, priority=rng.randint(0, 2))
            except TimeoutError:
                continue
            await asyncio.sleep(rng.random() / 500)
            r.release()

    await asyncio.gather(*(worker(i) for i in range(12)))
    assert m.granted_gib == 0 and m.waiting() == []
    assert peak > 0


async def test_transfer_moves_memory_without_freeing_it() -> None:
    m = ReservationManager(0, 10)
    a = m.try_acquire("a", 6)
    b = m.try_acquire("b", 4)
    assert a is not None and b is not None
    waiter = asyncio.create_task(m.acquire("c", 1))
    a.transfer_to(b, 2)
    await asyncio.sleep(0)
    assert (a.gib, b.gib, m.granted_gib) == (4, 6, 10) and not waiter.done()
    with pytest.raises(ValueError):
        a.transfer_to(b, 5)
    b.release()
    assert (await asyncio.wait_for(waiter, 1)).gib == 1

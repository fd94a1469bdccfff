"""Fair order across users within a model's queue (pure), and the fair slots built on it."""

from __future__ import annotations

import asyncio

import pytest

from jupyter_swapserve.service.fairness import FairQueue, FairSlots


def drain(queue: FairQueue[str]) -> list[str]:
    out = []
    while len(queue):
        out.append(queue.pop())
    return out


def test_a_single_request_is_not_starved_by_a_loop_of_many() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(500):
        q.push("heavy", 1.0, f"heavy-{i}")
    q.push("light", 1.0, "light-0")
    order = drain(q)
    assert order.index("light-0") <= 1  # served first or second, not 501st
    assert [x for x in order if x.startswith("heavy")] == [f"heavy-{i}" for i in range(500)]  # FIFO per user


def test_users_interleave_and_priority_is_a_weight() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(6):
        q.push("a", 1.0, f"a{i}")
        q.push("b", 2.0, f"b{i}")
    first_six = drain(q)[:6]
    assert first_six.count("b0") + first_six.count("b1") + first_six.count("b2") + first_six.count("b3") == 4
    assert sum(1 for x in first_six if x.startswith("a")) == 2  # b (priority 2) gets twice a's share


def test_a_late_arrival_starts_at_the_current_virtual_time() -> None:
    q: FairQueue[str] = FairQueue()
    for i in range(10):
        q.push("heavy", 1.0, f"h{i}")
    assert [q.pop() for _ in range(5)] == [f"h{i}" for i in range(5)]
    q.push("late", 1.0, "late")  # no credit for the time it was absent, but no debt either
    assert q.pop() in ("h5", "late")
    rest = drain(q)
    assert "late" not in rest[2:]


def test_removed_entries_are_skipped_and_give_back_their_turn() -> None:
    q: FairQueue[str] = FairQueue()
    handle = q.push("a", 1.0, "a0")
    q.push("b", 1.0, "b0")
    assert q.remove(handle) and not q.remove(handle)
    assert q.waiting_users() == {"b": 1}
    assert drain(q) == ["b0"]
    with pytest.raises(IndexError):
        q.pop()


async def test_fair_slots_serve_users_in_fair_order_and_survive_cancellation() -> None:
    slots = FairSlots(1)
    served: list[str] = []
    gate = asyncio.Event()

    async def request(user: str, tag: str) -> None:
        async with slots.hold(user, 1.0):
            served.append(tag)
            await gate.wait()

    holder = asyncio.create_task(request("heavy", "h0"))
    await asyncio.sleep(0)
    heavy = [asyncio.create_task(request("heavy", f"h{i}")) for i in range(1, 20)]
    await asyncio.sleep(0)
    light = asyncio.create_task(request("light", "l0"))
    cancelled = asyncio.create_task(request("light", "never"))
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    assert slots.waiting == 20
    gate.set()
    await asyncio.gather(holder, *heavy, light)
    assert served[0] == "h0" and served.index("l0") <= 2
    assert "never" not in served and len(served) == 21
    assert slots.in_use == 0 and slots.waiting == 0


async def test_a_slot_granted_as_its_waiter_is_cancelled_passes_on() -> None:
    slots = FairSlots(1)
    await slots.acquire("a")
    waiter = asyncio.create_task(slots.acquire("b"))
    other = asyncio.create_task(slots.acquire("c"))
    await asyncio.sleep(0)
    slots.release()  # granted to b ...
    waiter.cancel()  # ... who gives up before running
    await asyncio.sleep(0)
    await asyncio.wait_for(other, 1)  # c gets the slot
    assert slots.in_use == 1
    slots.release()
    assert slots.in_use == 0

"""The scheduler with real engine processes (Python's http.server stands in for an engine: a real
process on a real port) and injected step failures: every failed swap step is unwound, the
reservation is released exactly when the engine leaves the device, and nothing is left behind."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from jupyter_swapserve.config import parse_models
from jupyter_swapserve.service import EngineUnavailable, SwapService, build_service
from jupyter_swapserve.service.backend import State

from .waiting import until


def service(tmp_path: Path, *names: str, capacity: float = 1.0, **extra: object) -> SwapService:
    models = [{"name": n, "engine": "command", "command": ["{python}", "-m", "http.server", "--bind", "{host}",
                                                           "{port}", "--directory", str(tmp_path)],
               "ready_path": "/", "warmup": False, "memory_gib": 0.6, **extra} for n in names]
    return build_service(parse_models({"devices": [{"virtual": True, "memory_gib": capacity}], "models": models}))


async def started(svc: SwapService) -> SwapService:
    svc.start()
    await svc.wait_started(60)
    return svc


async def test_startup_snapshot_then_swaps_with_room_for_one(tmp_path: Path) -> None:
    svc = await started(service(tmp_path, "a", "b"))
    try:
        assert [b.state for b in svc.backends.values()] == [State.SWAPPED_OUT, State.SWAPPED_OUT]
        manager = svc.reservations[0]
        assert manager.granted_gib == 0
        await svc.swap_in("a")
        assert svc.backends["a"].state == State.RUNNING and manager.granted_gib == pytest.approx(0.6)
        await svc.swap_in("b")  # a is the only victim
        assert svc.backends["a"].state == State.SWAPPED_OUT and svc.backends["b"].state == State.RUNNING
        assert [r.owner for r in manager.granted()] == ["b"]
        assert [s.step for s in svc.backends["b"].last_steps] == ["thaw"]
        assert [s.step for s in svc.backends["a"].last_steps] == ["freeze"]
    finally:
        await svc.close()
    assert all(b.state == State.STOPPED for b in svc.backends.values())
    assert svc.reservations[0].granted_gib == 0


async def test_failed_freeze_is_unwound_and_the_victim_keeps_running(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    svc = await started(service(tmp_path, "a", "b"))
    try:
        await svc.swap_in("a")
        a = svc.backends["a"]
        runtime = a.runtime
        real_freeze = runtime.freeze

        async def freeze_then_fail() -> None:
            await real_freeze()  # the freeze happened, then something went wrong after it
            raise OSError("injected: freezer reported an error")

        monkeypatch.setattr(runtime, "freeze", freeze_then_fail)
        assert await svc.swap_out("a") is False
        assert a.state == State.RUNNING and not runtime.frozen  # thawed again by the undo
        assert "injected" in (a.error or "")
        assert a.reservation is not None and not a.reservation.released
        assert [(s.step, s.ok) for s in a.last_steps] == [("freeze", False), ("undo freeze", True)]
        monkeypatch.setattr(runtime, "freeze", real_freeze)
        assert await svc.swap_out("a") is True
        assert a.state == State.SWAPPED_OUT and a.reservation is None
    finally:
        await svc.close()


async def test_failed_swap_in_releases_the_reservation_and_stays_swapped_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = await started(service(tmp_path, "a"))
    try:
        a = svc.backends["a"]

        async def thaw_fails() -> None:
            raise OSError("injected: cannot thaw")

        real_thaw = a.runtime.thaw
        monkeypatch.setattr(a.runtime, "thaw", thaw_fails)
        with pytest.raises(EngineUnavailable, match="could not be swapped in"):
            await svc.swap_in("a")
        assert a.state == State.SWAPPED_OUT
        assert svc.reservations[0].granted_gib == 0
        monkeypatch.setattr(a.runtime, "thaw", real_thaw)
        assert await svc.swap_in("a") > 0
        assert a.state == State.RUNNING
    finally:
        await svc.close()


async def test_pinned_model_is_never_a_victim(tmp_path: Path) -> None:
    models = [
        {"name": "pinned", "engine": "command", "pinned": True, "memory_gib": 0.6, "ready_path": "/", "warmup": False,
         "command": ["{python}", "-m", "http.server", "--bind", "{host}", "{port}", "--directory", str(tmp_path)]},
        {"name": "other", "engine": "command", "memory_gib": 0.6, "ready_path": "/", "warmup": False,
         "command": ["{python}", "-m", "http.server", "--bind", "{host}", "{port}", "--directory", str(tmp_path)]},
    ]
    svc = build_service(parse_models({"devices": [{"virtual": True, "memory_gib": 1.0}], "models": models}))
    svc.start()
    try:
        await svc.backend("pinned").transition.acquire()  # wait for its start
        svc.backend("pinned").transition.release()
        await asyncio.sleep(0)
        with pytest.raises(EngineUnavailable, match="pinned"):
            await svc.swap_out("pinned")
        # "other" can never get room while the pinned model holds the device: it fails with the
        # reason instead of waiting forever, and the pinned model is untouched
        await asyncio.wait_for(svc.wait_started(), 10)
        assert svc.backend("pinned").state == State.RUNNING
        other = svc.backend("other")
        assert other.state == State.FAILED and "pinned models hold 0.60 of 1.00 GiB" in (other.error or "")
        with pytest.raises(EngineUnavailable, match="pinned models hold"):
            async with svc.admit("other"):
                pass
        assert other.queued == 0 and svc.reservations[0].waiting() == []
    finally:
        await svc.close()
    assert svc.reservations[0].granted_gib == 0


async def test_cancelled_request_waiting_for_memory_leaves_no_reservation(tmp_path: Path) -> None:
    svc = await started(service(tmp_path, "a", "b"))
    try:
        await svc.swap_in("a")
        a = svc.backends["a"]
        # a's residency quantum is over (within it, a request in flight keeps a on the device), so
        # b's swap-in evicts a and has to wait for the drain of a's request
        a.resident_since = time.monotonic() - 3600
        async with svc.admit("a") as ticket:
            assert ticket.backend is a
            waiting = asyncio.create_task(svc.swap_in("b"))
            await until(lambda: a.state == State.SWAPPING_OUT, "a's swap-out for b began (draining a's request)")
            assert not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        # the victim's swap-out, started for b, is not cut short by b's cancellation: it finishes
        # once a's request is done, instead of leaving a stuck in swapping_out
        for _ in range(100):
            if a.state == State.SWAPPED_OUT:
                break
            await asyncio.sleep(0.05)
        assert a.state == State.SWAPPED_OUT and a.reservation is None
        manager = svc.reservations[0]
        assert manager.waiting() == [] and manager.granted_gib == 0
        assert svc.backends["b"].state == State.SWAPPED_OUT and svc.backends["b"].reservation is None
        # and the device serves again
        async with svc.admit("b") as ticket:
            assert ticket.backend.state == State.RUNNING
    finally:
        await svc.close()


async def test_gpu_without_checkpoint_api_refuses_swap_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = service(tmp_path, "a")
    # the device is treated as a real GPU whose driver lacks the checkpoint API (the no-op checkpointer):
    # freezing alone would free the reservation but not the memory, so the swap-out is refused
    monkeypatch.setattr(svc.monitor, "all_virtual", lambda devices: False)
    monkeypatch.setattr(svc.monitor, "gpu_pids", lambda pids: list(pids))
    svc.start()
    try:
        await svc.wait_started(60)
        a = svc.backends["a"]
        assert a.state == State.RUNNING  # its startup snapshot was refused too
        assert await svc.swap_out("a") is False
        assert "no CUDA checkpoint API" in (a.error or "")
        assert a.reservation is not None and svc.reservations[0].granted_gib == pytest.approx(0.6)
        assert not a.runtime.frozen
    finally:
        await svc.close()


async def test_two_devices_are_reserved_and_swapped_independently(tmp_path: Path) -> None:
    cmd = ["{python}", "-m", "http.server", "--bind", "{host}", "{port}", "--directory", str(tmp_path)]
    models = [{"name": name, "engine": "command", "command": cmd, "ready_path": "/", "warmup": False,
               "memory_gib": 0.6, "device": device, "drain_timeout": 30}
              for name, device in (("a0", 0), ("b0", 0), ("a1", 1), ("b1", 1))]
    svc = build_service(parse_models({"devices": [{"virtual": True, "memory_gib": 1.0},
                                                {"virtual": True, "memory_gib": 1.0}], "models": models}))
    await started(svc)
    try:
        m0, m1 = svc.reservations[0], svc.reservations[1]
        await svc.swap_in("a0")
        await svc.swap_in("a1")
        # each device has room for one: both run at once, one per device
        assert {b.name for b in svc.backends.values() if b.state == State.RUNNING} == {"a0", "a1"}
        assert (m0.granted_gib, m1.granted_gib) == (pytest.approx(0.6), pytest.approx(0.6))
        # a request in flight on a0 holds up any swap on device 0 (a0 was just swapped in: its
        # quantum protects the request's model, which stays running) ...
        async with svc.admit("a0"):
            stuck = asyncio.create_task(svc.swap_in("b0"))
            await until(lambda: [owner for owner, _, _ in m0.waiting()] == ["b0"], "b0 queued for device 0")
            assert not stuck.done() and svc.backends["a0"].state == State.RUNNING
            # ... but never a swap on device 1
            await asyncio.wait_for(svc.swap_in("b1"), 5)
            assert svc.backends["b1"].state == State.RUNNING and svc.backends["a1"].state == State.SWAPPED_OUT
            assert [r.owner for r in m1.granted()] == ["b1"]
        # the request's end notifies: b0's waiter plans again at once, a0 has nothing left to protect
        await asyncio.wait_for(stuck, 10)
        assert svc.backends["b0"].state == State.RUNNING and [r.owner for r in m0.granted()] == ["b0"]
        assert svc.backends["a0"].state == State.SWAPPED_OUT
        assert m0.granted_gib <= m0.capacity_gib and m1.granted_gib <= m1.capacity_gib
    finally:
        await svc.close()


def two_device_service(tmp_path: Path, extra: list[dict] | None = None) -> SwapService:
    cmd = ["{python}", "-m", "http.server", "--bind", "{host}", "{port}", "--directory", str(tmp_path)]
    models = [{"name": name, "engine": "command", "command": cmd, "ready_path": "/", "warmup": False,
               "memory_gib": 0.6, "device": device} for name, device in (("wide", [1, 0]), ("a0", 0), ("a1", 1))]
    for m in extra or []:
        models.append({"engine": "command", "command": cmd, "ready_path": "/", "warmup": False, **m})
    return build_service(parse_models({"devices": [{"virtual": True, "memory_gib": 1.0},
                                                {"virtual": True, "memory_gib": 1.0}], "models": models}))


async def test_an_engine_spanning_two_devices_is_reserved_and_evicted_on_both(tmp_path: Path) -> None:
    svc = await started(two_device_service(tmp_path))
    try:
        m0, m1 = svc.reservations[0], svc.reservations[1]
        wide = svc.backends["wide"]
        assert wide.devices == [0, 1]
        await svc.swap_in("a0")
        await svc.swap_in("a1")
        # the wide engine needs room on both devices: one victim on each
        await svc.swap_in("wide")
        assert wide.state == State.RUNNING
        assert svc.backends["a0"].state == svc.backends["a1"].state == State.SWAPPED_OUT
        assert [r.owner for r in m0.granted()] == ["wide"] and [r.owner for r in m1.granted()] == ["wide"]
        assert wide.reserved_gib == pytest.approx(1.2)
        assert svc.status()["models"][0]["devices"] == [0, 1]
        # a single-device model evicts it, which frees both devices
        await svc.swap_in("a1")
        assert wide.state == State.SWAPPED_OUT and wide.reservation is None
        assert m0.granted_gib == 0 and [r.owner for r in m1.granted()] == ["a1"]
    finally:
        await svc.close()
    assert m0.granted_gib == 0 and m1.granted_gib == 0


async def test_no_room_on_the_second_device_releases_the_first(tmp_path: Path) -> None:
    svc = await started(two_device_service(tmp_path, [{"name": "pin1", "memory_gib": 0.6, "device": 1,
                                                       "pinned": True}]))
    try:
        m0 = svc.reservations[0]
        wide = svc.backends["wide"]
        assert svc.backends["pin1"].state == State.RUNNING
        assert wide.state == State.SWAPPED_OUT  # started (and snapshotted) before pin1 took device 1
        with pytest.raises(EngineUnavailable, match=r"pinned models hold 0\.60 of 1\.00 GiB on device 1"):
            await svc.swap_in("wide")
        assert wide.state == State.SWAPPED_OUT and wide.reservation is None
        assert m0.granted_gib == 0 and m0.waiting() == []  # the reservation taken on device 0 was given back
        await svc.swap_in("a0")
        assert svc.backends["a0"].state == State.RUNNING
    finally:
        await svc.close()


def test_models_file_accepts_a_device_list_and_checks_it() -> None:
    loaded = parse_models({"devices": [{"virtual": True, "memory_gib": 1}, {"virtual": True, "memory_gib": 1}],
                           "models": [{"name": "w", "engine": "command", "command": "x", "device": [1, 0]},
                                      {"name": "bad", "engine": "command", "command": "x", "device": [0, 2]},
                                      {"name": "empty", "engine": "command", "command": "x", "device": []},
                                      {"name": "keep", "engine": "reference", "model": "m", "device": [0, 1],
                                       "residual": "keep"}]}, "f.yaml")
    assert [m.name for m in loaded.models] == ["w"] and loaded.models[0].devices == [0, 1]
    assert "model 'bad': field 'device': 2 does not exist" in loaded.errors[0]
    assert "model 'empty': field 'device'" in loaded.errors[1]
    assert "model 'keep': field 'residual': 'keep' is for single-device engines" in loaded.errors[2]


def waiter_for_b(svc: SwapService) -> asyncio.Task:
    """b queued for its memory on device 0, with a re-plan timer far beyond the test."""
    manager = svc.reservations[0]
    return asyncio.create_task(svc.placement.wait_for_memory_or_victim(manager, "b", 0.6, replan_s=60))


async def test_a_waiter_for_memory_plans_again_when_the_protected_work_ends(tmp_path: Path) -> None:
    svc = await started(service(tmp_path, "a", "b"))
    try:
        await svc.swap_in("a")
        manager = svc.reservations[0]
        async with svc.admit("a"):
            # a was just swapped in and serves a request: protected, so b can only queue
            waiter = waiter_for_b(svc)
            await until(lambda: [o for o, _, _ in manager.waiting()] == ["b"], "b queued for the memory")
            assert not waiter.done()
        # the request's end makes a a victim: the waiter returns at once (None: go and evict),
        # long before its 60 s re-plan, and leaves nothing queued
        assert await asyncio.wait_for(waiter, 5) is None
        assert manager.waiting() == [] and [r.owner for r in manager.granted()] == ["a"]
        # memory set free while it waits is granted to it, in its place in the queue
        waiter = waiter_for_b(svc)
        await until(lambda: [o for o, _, _ in manager.waiting()] == ["b"], "b queued again")
        assert await svc.swap_out("a")
        reservation = await asyncio.wait_for(waiter, 5)
        assert reservation is not None and reservation.owner == "b" and manager.granted_gib == pytest.approx(0.6)
        reservation.release()
    finally:
        await svc.close()


async def test_a_waiter_cancelled_leaves_no_reservation_behind(tmp_path: Path) -> None:
    svc = await started(service(tmp_path, "a", "b"))
    try:
        await svc.swap_in("a")
        manager = svc.reservations[0]
        async with svc.admit("a"):
            waiter = waiter_for_b(svc)
            await until(lambda: [o for o, _, _ in manager.waiting()] == ["b"], "b queued for the memory")
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert manager.waiting() == [] and [r.owner for r in manager.granted()] == ["a"]
    finally:
        await svc.close()

"""Faults inside a swap, through the real scheduler with real engine processes (Python's
http.server as the engine) on a device treated as a GPU whose checkpoint driver is libcuda's
stand-in (tests/test_checkpoint.py's FakeDriver, through the real ctypes layer): a lock that
times out, a checkpoint that fails after the lock, a restore that fails on swap-in. After each:
the failed steps are unwound, no reservation is leaked, the model serves again, and the metrics
and the event log record the failure. And a client that goes away during a swap-in: the step in
progress ends, everything is undone, the cancellation goes through, the books are exact."""

from __future__ import annotations

import asyncio
import ctypes
import threading
from pathlib import Path

import pytest

from jupyter_swapserve.gpu import checkpoint as ck
from jupyter_swapserve.service import EngineUnavailable, SwapService
from jupyter_swapserve.service.backend import State
from jupyter_swapserve.service.eventlog import EventLog, read_events
from jupyter_swapserve.service.metrics import SwapMetrics

from .test_checkpoint import FakeDriver
from .test_scheduler import service


async def gpu_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, driver: FakeDriver, capacity: float = 1.0,
                      ) -> tuple[SwapService, SwapMetrics, Path]:
    svc = service(tmp_path, "a", "b", capacity=capacity)
    monkeypatch.setattr(svc.monitor, "all_virtual", lambda devices: False)
    monkeypatch.setattr(svc.monitor, "gpu_pids", lambda pids: list(pids))
    svc.driver.checkpointer = ck.CudaCheckpointer(driver)
    metrics = SwapMetrics(list(svc.backends), status=svc.status)
    log_path = tmp_path / "events.jsonl"
    svc.record.observers += [metrics, EventLog(log_path)]
    svc.start()
    await svc.wait_started(60)
    return svc, metrics, log_path


def no_leak(svc: SwapService) -> None:
    """Reservations are exactly those of running engines."""
    running = {b.name for b in svc.backends.values() if b.state == State.RUNNING}
    assert {r.owner for r in svc.reservations[0].granted()} == running


async def test_lock_timeout_is_unwound_and_the_engine_keeps_serving(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    driver = FakeDriver({"cuCheckpointProcessLock": 600})  # what the H100's driver returns on a lock timeout
    # room for both: with room for one, b could not start while a cannot be swapped out
    svc, metrics, log_path = await gpu_service(tmp_path, monkeypatch, driver, capacity=2.0)
    try:
        a = svc.backends["a"]
        assert a.state == State.RUNNING  # its startup snapshot could not lock either
        assert await svc.swap_out("a") is False
        assert a.state == State.RUNNING and not a.runtime.frozen
        assert "lock timed out" in (a.error or "")
        assert a.reservation is not None and not a.reservation.released
        no_leak(svc)
        async with svc.admit("a") as ticket:  # still serves
            assert ticket.backend.state == State.RUNNING
        failed = metrics.registry.get_sample_value("swapserve_swaps_total",
                                                   {"model": "a", "direction": "out", "outcome": "failed"})
        assert failed is not None and failed >= 2  # the startup snapshot and the requested swap-out
        events = [e for e in read_events(log_path) if e["model"] == "a" and e["event"] == "swap"]
        assert events[-1]["ok"] is False and events[-1]["steps"][0] == {**events[-1]["steps"][0], "step": "lock",
                                                                          "ok": False}
        # the driver recovers: the next swap-out goes through lock → checkpoint → freeze
        driver.results.clear()
        assert await svc.swap_out("a") is True
        assert [s.step for s in a.last_steps] == ["lock", "checkpoint", "freeze"]
        assert a.state == State.SWAPPED_OUT and a.reservation is None
        no_leak(svc)
        await svc.swap_in("a")
        assert [s.step for s in a.last_steps] == ["thaw", "restore", "unlock"]
        no_leak(svc)
    finally:
        await svc.close()
    assert svc.reservations[0].granted_gib == 0


async def test_checkpoint_failing_after_the_lock_unlocks_again(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    driver = FakeDriver({"cuCheckpointProcessCheckpoint": 2})  # CUDA_ERROR_OUT_OF_MEMORY
    svc, _, _ = await gpu_service(tmp_path, monkeypatch, driver, capacity=2.0)
    try:
        a = svc.backends["a"]
        pid = a.runtime.pids()[0]
        driver.calls.clear()
        assert await svc.swap_out("a") is False
        assert driver.calls[:3] == [("cuCheckpointProcessLock", pid), ("cuCheckpointProcessCheckpoint", pid),
                                    ("cuCheckpointProcessUnlock", pid)]
        assert [(s.step, s.ok) for s in a.last_steps] == [("lock", True), ("checkpoint", False),
                                                          ("undo lock", True)]
        assert a.state == State.RUNNING and not a.runtime.frozen
        no_leak(svc)
    finally:
        await svc.close()


async def test_restore_failing_on_swap_in_is_unwound_and_the_reservation_released(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver = FakeDriver()
    svc, metrics, log_path = await gpu_service(tmp_path, monkeypatch, driver)
    try:
        a, b = svc.backends["a"], svc.backends["b"]
        assert a.state == b.state == State.SWAPPED_OUT  # startup snapshots checkpointed both
        driver.results["cuCheckpointProcessRestore"] = 2
        with pytest.raises(EngineUnavailable, match="could not be swapped in"):
            await svc.swap_in("a")
        assert a.state == State.SWAPPED_OUT and a.runtime.frozen  # re-checkpointed and frozen again
        assert "restore" in (a.error or "")
        no_leak(svc)
        assert svc.reservations[0].granted_gib == 0
        assert metrics.registry.get_sample_value(
            "swapserve_swaps_total", {"model": "a", "direction": "in", "outcome": "failed"}) == 1
        del driver.results["cuCheckpointProcessRestore"]
        await svc.swap_in("a")
        assert a.state == State.RUNNING
        no_leak(svc)
        await svc.swap_in("b")  # evicts a through the checkpoint path
        assert metrics.registry.get_sample_value("swapserve_evictions_total", {"model": "a"}) == 1
        assert metrics.registry.get_sample_value(
            "swapserve_swap_seconds_count", {"model": "a", "direction": "out", "path": "checkpoint"}) == 2
        assert any(e["event"] == "eviction" and e["model"] == "a" for e in read_events(log_path))
        no_leak(svc)
    finally:
        await svc.close()


async def test_a_request_whose_only_victim_cannot_be_swapped_out_is_refused_not_left_waiting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver = FakeDriver()
    svc, _, _ = await gpu_service(tmp_path, monkeypatch, driver)  # room for one
    try:
        await svc.swap_in("a")
        driver.results["cuCheckpointProcessLock"] = 600  # a can no longer be swapped out
        with pytest.raises(EngineUnavailable):
            await asyncio.wait_for(svc.swap_in("b"), 20)
        no_leak(svc)
        assert svc.backends["a"].state == State.RUNNING
    finally:
        await svc.close()


class SlowRestore(FakeDriver):
    """A driver whose restore takes until the test lets it finish (a big model's restore takes seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.restoring, self.finish = threading.Event(), threading.Event()

    def _fn(self, name: str):
        call = super()._fn(name)
        if name != "cuCheckpointProcessRestore":
            return call

        def slow(pid: ctypes.c_int, args: object) -> int:
            self.restoring.set()
            self.finish.wait(60)
            return call(pid, args)
        return slow


async def test_a_client_gone_mid_swap_in_leaves_exact_books_and_a_valid_engine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    driver = SlowRestore()
    svc, metrics, _ = await gpu_service(tmp_path, monkeypatch, driver)  # room for one
    try:
        a = svc.backends["a"]
        assert a.state == State.SWAPPED_OUT and a.checkpointed_pids
        pid = a.checkpointed_pids[0]

        async def client() -> None:
            async with svc.admit("a"):
                raise AssertionError("never served: the client went away during the swap-in")

        request = asyncio.create_task(client())
        assert await asyncio.to_thread(driver.restoring.wait, 30)
        driver.calls.clear()
        request.cancel()  # what the route does when the client disconnects
        driver.finish.set()  # the restore in progress runs to its end, then is undone
        with pytest.raises(asyncio.CancelledError):
            await request  # the cancellation itself, not an EngineUnavailable in a cancelled task
        assert [(s.step, s.ok) for s in a.last_steps] == [("thaw", True), ("restore", True),
                                                          ("undo restore", True), ("undo thaw", True)]
        assert driver.calls == [("cuCheckpointProcessRestore", pid), ("cuCheckpointProcessCheckpoint", pid)]
        # the books: nothing reserved, nothing queued or in flight, the engine swapped out as before
        assert a.state == State.SWAPPED_OUT and a.runtime.frozen and a.error is None
        assert a.reservation is None and svc.reservations[0].granted_gib == 0 and svc.reservations[0].waiting() == []
        assert (a.queued, a.in_flight, a.checkpointed_pids) == (0, 0, [pid])
        no_leak(svc)
        assert metrics.registry.get_sample_value(
            "swapserve_swaps_total", {"model": "a", "direction": "in", "outcome": "failed"}) == 1
        # and valid: the next request swaps it in through every step and is served
        async with svc.admit("a") as ticket:
            assert ticket.backend.state == State.RUNNING
        assert [s.step for s in a.last_steps] == ["thaw", "restore", "unlock"]
        no_leak(svc)
    finally:
        driver.finish.set()
        await svc.close()
    assert svc.reservations[0].granted_gib == 0

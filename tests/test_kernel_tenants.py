"""KernelTenants (service/kernels.py) without a Jupyter server: real processes stand in for kernels
on a virtual device (counted by their resident host memory, as `kernel_tenants_on_virtual_device`
does), their facts come from a facts source, and their memory from the real placement, shared with
a model's requests. The end-to-end path (real kernels, the websocket) is tests/test_kernels.py."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from jupyter_swapserve.config import DeviceConfig
from jupyter_swapserve.gpu.checkpoint import NoCheckpointer
from jupyter_swapserve.gpu.monitor import GpuMonitor
from jupyter_swapserve.runtime.procfs import rss_bytes
from jupyter_swapserve.service.background import Background
from jupyter_swapserve.service.events import Notifier
from jupyter_swapserve.service.kernels import KernelFacts, KernelSwapError, KernelTenants
from jupyter_swapserve.service.placement import Placement
from jupyter_swapserve.service.reservations import ReservationManager
from jupyter_swapserve.service.states import State
from jupyter_swapserve.service.steps import DriverSteps, StepTiming, SwapRecord

from .kernel_processes import kernel_process

GIB = 1024**3


class Recorder:
    def __init__(self) -> None:
        self.swaps: list[tuple[str, str]] = []

    def swap_recorded(self, model: str, what: str, timings: list[StepTiming]) -> None:
        self.swaps.append((model, what))

    def engine_failed(self, model: str, reason: str) -> None:
        pass


class Facts:
    """The facts source: what a Jupyter server would report of its kernels."""

    def __init__(self) -> None:
        self.kernels: dict[str, KernelFacts] = {}

    def add(self, kernel_id: str, pid: int, user: str = "ada", busy: bool = False) -> None:
        self.kernels[kernel_id] = KernelFacts(kernel_id, user, f"{kernel_id}.ipynb", (pid,), busy, time.time())

    async def facts(self) -> list[KernelFacts]:
        return list(self.kernels.values())


def tenants(capacity_gib: float, limits: object = None) -> tuple[KernelTenants, Facts, ReservationManager, Recorder]:
    notifier = Notifier()
    manager = ReservationManager(0, capacity_gib, on_change=notifier.notify)
    background = Background()
    placement = Placement({0: manager}, notifier, background)
    recorder = Recorder()
    facts = Facts()
    kernels = KernelTenants(placement, DriverSteps(NoCheckpointer()), SwapRecord([recorder]),
                            GpuMonitor([DeviceConfig(virtual=True, memory_gib=capacity_gib)]), notifier, background,
                            virtual=True, facts=facts, **({"limits": limits} if limits else {}))
    placement.register(kernels)
    return kernels, facts, manager, recorder


async def test_a_kernel_is_booked_swapped_out_and_in_and_forgotten_when_it_is_gone(
        processes: list[subprocess.Popen[bytes]]) -> None:
    kernels, facts, manager, recorder = tenants(1.0)
    pid = kernel_process(processes)
    facts.add("k1", pid)
    await kernels.refresh()
    tenant = kernels.tenants["k1"]
    assert tenant.state == State.RUNNING and kernels.status()[0]["state"] == "resident"
    assert tenant.reservation is not None and tenant.reservation.gib == pytest.approx(rss_bytes([pid]) / GIB, rel=0.5)
    assert [r.owner for r in manager.granted()] == ["kernel k1"]

    assert await kernels.swap_out("k1", "released by its user")
    assert tenant.state == State.SWAPPED_OUT and tenant.reservation is None and manager.granted() == []
    assert kernels.status()[0]["last_swap_out_reason"] == "released by its user" and tenant.swaps_out == 1
    assert kernels.begin_execution("k1")  # its next cell needs the GPU state back first
    seconds = await kernels.swap_in("k1")
    assert seconds >= 0 and tenant.state == State.RUNNING and tenant.swaps_in == 1
    assert [r.owner for r in manager.granted()] == ["kernel k1"]
    assert recorder.swaps == [("kernel k1", "swap-out (released by its user)"), ("kernel k1", "swap-in")]

    del facts.kernels["k1"]  # shut down
    await kernels.refresh()
    assert kernels.tenants == {} and manager.granted() == []


async def test_a_models_request_evicts_an_idle_kernel_but_never_a_busy_one(
        processes: list[subprocess.Popen[bytes]]) -> None:
    kernels, facts, manager, _ = tenants(1.0)
    facts.add("idle", kernel_process(processes))
    facts.add("busy", kernel_process(processes), busy=True)
    await kernels.refresh()
    busy_gib = kernels.tenants["busy"].gib
    need = manager.capacity_gib - busy_gib  # all but what the busy kernel holds: only the idle one can go
    granted = await asyncio.wait_for(kernels.placement.reserve_on("model", 0, need), 10)
    assert kernels.tenants["idle"].state == State.SWAPPED_OUT
    assert kernels.tenants["busy"].state == State.RUNNING
    granted.release()
    # the busy kernel is never a victim: a request that needs its memory waits, and leaves nothing behind
    waiting = asyncio.create_task(kernels.placement.reserve_on("model", 0, manager.capacity_gib))
    await asyncio.sleep(0)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(waiting), 1.5)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert kernels.tenants["busy"].state == State.RUNNING and manager.waiting() == []
    assert [r.owner for r in manager.granted()] == ["kernel busy"]


async def test_a_users_limit_swaps_out_their_other_kernels_or_refuses_the_swap_in(
        processes: list[subprocess.Popen[bytes]]) -> None:
    limit: dict[str, float] = {}
    kernels, facts, manager, _ = tenants(1.0, limits=lambda user: (limit.get(user), None))
    facts.add("a", kernel_process(processes))
    facts.add("b", kernel_process(processes))
    await kernels.refresh()
    a, b = kernels.tenants["a"], kernels.tenants["b"]
    assert await kernels.swap_out("a", "idle")
    limit["ada"] = max(a.gib, b.gib) * 1.5  # room for one of her kernels
    await kernels.swap_in("a")  # b, idle, makes room within her limit
    assert a.state == State.RUNNING and b.state == State.SWAPPED_OUT
    assert b.last_swap_out_reason == "its user's kernels are over their GPU memory limit"
    b.busy = a.busy = True  # now neither may go
    limit["ada"] = min(a.gib, b.gib) / 2
    with pytest.raises(KernelSwapError, match="would hold more than their limit"):
        await kernels.swap_in("b")
    assert b.state == State.SWAPPED_OUT and b.reservation is None
    assert [r.owner for r in manager.granted()] == ["kernel a"]

"""RemoteKernels (service/remote_kernels.py) and its command channels (service/kernel_owners.py)
without a Jupyter server: real processes stand in for the kernels of users' servers on a virtual
device (counted by their host memory), their reports and the owners' answers go through the same
calls the handlers make (handlers/kernel_reports.py), and the memory comes from the real placement.
The whole path, with real servers under a real JupyterHub, is tests/test_hub_kernels.py."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from jupyter_swapserve.config import DeviceConfig
from jupyter_swapserve.gpu.checkpoint import NoCheckpointer
from jupyter_swapserve.gpu.monitor import GpuMonitor
from jupyter_swapserve.runtime.procfs import rss_bytes, start_ticks
from jupyter_swapserve.service.background import Background
from jupyter_swapserve.service.events import Notifier
from jupyter_swapserve.service.kernel_owners import NotYourCommand, OwnerAnswer, OwnerChannel, OwnerChannels
from jupyter_swapserve.service.kernels import KernelSwapError
from jupyter_swapserve.service.placement import Placement
from jupyter_swapserve.service.remote_kernels import KernelReport, RemoteKernels, ReportRefused, ServerReport
from jupyter_swapserve.service.reservations import ReservationManager
from jupyter_swapserve.service.states import State
from jupyter_swapserve.service.steps import DriverSteps, SwapRecord

from .kernel_processes import kernel_process
from .test_status_schema import status_errors

HOST = "this-host"


def kernel_report(kernel_id: str, pid: int, *, resident: bool = True, busy: bool = False, moves: int = 0,
                  last: float = 100.0) -> KernelReport:
    return KernelReport(kernel_id, f"{kernel_id}.ipynb", (pid,), start_ticks(pid) or "", busy, last, resident,
                        rss_bytes([pid]) / 1024**3, moves=moves)


def remote(capacity_gib: float = 1.0, lease_s: float = 30.0) -> tuple[RemoteKernels, ReservationManager]:
    notifier = Notifier()
    manager = ReservationManager(0, capacity_gib, on_change=notifier.notify)
    background = Background()
    placement = Placement({0: manager}, notifier, background)
    kernels = RemoteKernels(placement, DriverSteps(NoCheckpointer()), SwapRecord([]),
                            GpuMonitor([DeviceConfig(virtual=True, memory_gib=capacity_gib)]), notifier, background,
                            virtual=True, owners=OwnerChannels(), lease_s=lease_s, answer_timeout_s=0.5,
                            host=HOST)
    placement.register(kernels)
    return kernels, manager


async def serve(owners: OwnerChannels, channel: OwnerChannel, answer: bool = True) -> list[str]:
    """A server's side of its channel: takes each command and answers it done (or never, ``answer``
    False: a server that ignores its commands). Returns what it was asked."""
    asked: list[str] = []
    while True:
        command = await channel.next(30)
        if command is None:
            continue
        asked.append(f"{command.action} {command.kernel_id}")
        if answer:
            owners.answer(channel.user, command.id, "started")
            owners.answer(channel.user, command.id, "done", OwnerAnswer(ok=True, moves=1))


async def test_a_reported_kernel_is_booked_evicted_by_its_owner_and_restored(
        processes: list[subprocess.Popen[bytes]]) -> None:
    kernels, manager = remote()
    pid = kernel_process(processes)
    answer = kernels.report(ServerReport("ada", "", HOST, (kernel_report("k1", pid),)))
    assert answer["kernels"]["k1"]["booked"] and [r.owner for r in manager.granted()] == ["kernel k1"]
    tenant = kernels.tenants["k1"]
    assert status_errors(tenant.status(), "kernel") == [] and tenant.status()["owner"] == "not answering"
    # no channel open: nobody could move it, so it is no victim and a request cannot take its memory
    assert kernels.snapshots()[0].busy and not await kernels.swap_out("k1", "idle")
    channel = kernels.owners.open("ada", "")
    owner = asyncio.create_task(serve(kernels.owners, channel))
    try:
        need = manager.capacity_gib - tenant.gib / 2  # more than is free: the kernel must go
        granted = await asyncio.wait_for(kernels.placement.reserve_on("model", 0, need), 10)
        assert tenant.state == State.SWAPPED_OUT and tenant.last_swap_out_reason == "preempted for model"
        granted.release()
        assert await kernels.swap_in("k1") >= 0 and tenant.state == State.RUNNING
        assert [r.owner for r in manager.granted()] == ["kernel k1"]
    finally:
        owner.cancel()
    # a report made before the swap-in's answer and taken after it says nothing of where the memory is
    kernels.report(ServerReport("ada", "", HOST, (kernel_report("k1", pid, resident=False, moves=0),)))
    assert tenant.state == State.RUNNING and tenant.reservation is not None
    kernels.report(ServerReport("ada", "", HOST, ()))  # shut down on its server
    assert kernels.tenants == {} and manager.granted() == []


async def test_an_owner_that_does_not_answer_is_passed_over_for_another_victim(
        processes: list[subprocess.Popen[bytes]]) -> None:
    kernels, manager = remote()
    old, new = kernel_process(processes, "ada"), kernel_process(processes, "bob")
    kernels.report(ServerReport("ada", "", HOST, (kernel_report("old", old, last=1.0),)))
    kernels.report(ServerReport("bob", "", HOST, (kernel_report("new", new, last=2.0),)))
    hung = asyncio.create_task(serve(kernels.owners, kernels.owners.open("ada", ""), answer=False))
    good = asyncio.create_task(serve(kernels.owners, kernels.owners.open("bob", "")))
    try:
        # more than is free, and either kernel's memory is enough
        gibs = [kernels.tenants["old"].gib, kernels.tenants["new"].gib]
        need = manager.capacity_gib - max(gibs) - min(gibs) / 2
        granted = await asyncio.wait_for(kernels.placement.reserve_on("model", 0, need), 15)
        assert kernels.tenants["old"].state == State.RUNNING and "did not answer" in kernels.tenants["old"].error
        assert kernels.tenants["new"].state == State.SWAPPED_OUT
        assert kernels.tenants["old"].reservation is not None  # it still holds its memory: still booked
        assert manager.granted_gib <= manager.capacity_gib
        granted.release()
    finally:
        hung.cancel()
        good.cancel()


async def test_a_lost_owners_kernel_counts_while_its_process_lives(processes: list[subprocess.Popen[bytes]]) -> None:
    kernels, manager = remote(lease_s=0.2)
    pid = kernel_process(processes)
    kernels.report(ServerReport("ada", "", HOST, (kernel_report("k1", pid),)))
    await asyncio.sleep(0.3)
    kernels.expire()
    tenant = kernels.tenants["k1"]
    assert tenant.owner_state() == "lost" and tenant.reservation is not None and tenant.reservation.gib > 0
    assert kernels.snapshots()[0].busy  # no victim: nobody could move it
    processes[0].kill()
    processes[0].wait()
    kernels.expire()
    assert kernels.tenants == {} and manager.granted() == []


async def test_a_server_reports_only_its_own_users_kernels(processes: list[subprocess.Popen[bytes]]) -> None:
    kernels, _ = remote()
    adas, bobs = kernel_process(processes, "ada"), kernel_process(processes, "bob")
    kernels.report(ServerReport("ada", "", HOST, (kernel_report("k1", adas),)))
    with pytest.raises(ReportRefused, match="another user"):
        kernels.report(ServerReport("bob", "", HOST, (kernel_report("k1", bobs),)))
    with pytest.raises(ReportRefused, match="not a process of bob"):
        kernels.report(ServerReport("bob", "", HOST, (kernel_report("k2", adas),)))
    with pytest.raises(ReportRefused, match="another server"):
        kernels.report(ServerReport("ada", "other", HOST, (kernel_report("k1", adas),)))
    assert list(kernels.tenants) == ["k1"] and kernels.tenants["k1"].user == "ada"
    # a report from another host books nothing here
    assert kernels.report(ServerReport("bob", "", "another-host", (kernel_report("k3", bobs),)))["node"] == "elsewhere"
    assert list(kernels.tenants) == ["k1"]


async def test_a_swap_in_the_owner_may_have_done_stays_booked(processes: list[subprocess.Popen[bytes]]) -> None:
    kernels, manager = remote()
    pid = kernel_process(processes)
    kernels.report(ServerReport("ada", "", HOST, (kernel_report("k1", pid, resident=False, moves=1),)))
    tenant = kernels.tenants["k1"]
    assert tenant.state == State.SWAPPED_OUT and manager.granted() == []
    channel = kernels.owners.open("ada", "")

    async def started_then_silent() -> None:
        command = await channel.next(10)
        assert command is not None
        kernels.owners.answer("ada", command.id, "started")
        kernels.owners.close(channel)  # gone mid-restore: it may or may not have restored

    task = asyncio.create_task(started_then_silent())
    with pytest.raises(KernelSwapError, match="closed its command channel"):
        await kernels.swap_in("k1")
    await task
    assert tenant.state == State.RUNNING and [r.owner for r in manager.granted()] == ["kernel k1"]


async def test_every_command_ends_once_and_only_its_user_answers_it() -> None:
    owners = OwnerChannels()
    channel = owners.open("ada", "")
    asking = asyncio.create_task(owners.ask("ada", "", "k1", "swap-out", "idle", answer_timeout=5, gib=1.0))
    command = await channel.next(5)
    assert command is not None and command.action == "swap-out" and command.deadline > time.time()
    with pytest.raises(NotYourCommand):
        owners.answer("bob", command.id, "done")
    assert owners.answer("ada", command.id, "failed", OwnerAnswer(ok=False, error="busy", busy=True))
    assert (await asking).busy
    assert not owners.answer("ada", command.id, "done")  # ended already: changes nothing
    # no channel: at once; a silent owner: after the answer timeout
    with pytest.raises(Exception, match="no command channel"):
        await owners.ask("bob", "", "k2", "swap-out", "idle", answer_timeout=5, gib=1.0)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="did not answer"):
        await owners.ask("ada", "", "k1", "swap-out", "idle", answer_timeout=0.3, gib=1.0)
    assert time.monotonic() - t0 < 2 and owners.pending == {}

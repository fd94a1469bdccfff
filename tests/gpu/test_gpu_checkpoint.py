"""The CUDA checkpoint driver API on a real GPU, without the service: the state machine, memory
really leaving the device, data intact after restore, and the errors of the refused cases
(their CUresult codes are printed, so a run on new hardware shows what it returns)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from jupyter_swapserve.gpu.checkpoint import CheckpointError, CudaCheckpointer, ProcessState

pytestmark = pytest.mark.gpu
GIB = 1024**3

CHILD = textwrap.dedent("""
    import sys, threading, time, torch
    x = torch.arange(GIB_N * (1 << 28), dtype=torch.float32, device="cuda")  # GIB_N GiB with a pattern
    want = float(x[::4097].sum())
    torch.cuda.synchronize()
    ticks = [0]
    def tick():  # a thread that makes no CUDA calls keeps running while checkpointed
        while True:
            ticks[0] += 1
            time.sleep(0.05)
    threading.Thread(target=tick, daemon=True).start()
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "CHECK":
            print("OK" if float(x[::4097].sum()) == want else "BAD", ticks[0], flush=True)
        elif cmd == "BUSY":  # a kernel that spins for ~3 s, so a lock cannot complete meanwhile
            torch.cuda._sleep(int(3 * 1.98e9))
            print("BUSY", flush=True)  # launched: it runs on the GPU from now on
        elif cmd == "SYNC":
            torch.cuda.synchronize()
            print("SYNCED", flush=True)
""")


def nvml_used_by(pid: int) -> float:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return sum((p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
               if p.pid == pid) / GIB


class Child:
    def __init__(self, gib: int) -> None:
        code = CHILD.replace("GIB_N", str(gib))
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        assert self.read() == "READY"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child(4)
    try:
        yield c
    finally:
        c.proc.kill()
        c.proc.wait()


@pytest.fixture(scope="module")
def ckpt() -> CudaCheckpointer:
    return CudaCheckpointer()


def test_cycle_frees_memory_and_keeps_data(child: Child, ckpt: CudaCheckpointer) -> None:
    assert nvml_used_by(child.pid) > 3.5
    assert ckpt.state(child.pid) == ProcessState.RUNNING
    t0 = time.perf_counter()
    ckpt.lock(child.pid, 5000)
    assert ckpt.state(child.pid) == ProcessState.LOCKED
    t1 = time.perf_counter()
    ckpt.checkpoint(child.pid)
    t2 = time.perf_counter()
    assert ckpt.state(child.pid) == ProcessState.CHECKPOINTED
    assert nvml_used_by(child.pid) < 0.1, "checkpointed memory leaves the device"
    ckpt.restore(child.pid)
    t3 = time.perf_counter()
    assert ckpt.state(child.pid) == ProcessState.LOCKED
    ckpt.unlock(child.pid)
    t4 = time.perf_counter()
    assert ckpt.state(child.pid) == ProcessState.RUNNING
    answer, ticks = child.ask("CHECK").split()
    assert answer == "OK", "device data intact after restore"
    assert int(ticks) > 0
    print(f"\nRAW 4 GiB: lock {1e3 * (t1 - t0):.1f} ms, checkpoint {t2 - t1:.3f} s, restore {t3 - t2:.3f} s, "
          f"unlock {1e3 * (t4 - t3):.1f} ms; used after restore {nvml_used_by(child.pid):.2f} GiB")


def test_wrong_state_and_bad_pids_are_refused(child: Child, ckpt: CudaCheckpointer) -> None:
    codes = {}
    with pytest.raises(CheckpointError) as info:
        ckpt.restore(child.pid)  # running, not checkpointed
    codes["restore of a running process"] = info.value.code
    with pytest.raises(CheckpointError) as info:
        ckpt.unlock(child.pid)  # not locked
    codes["unlock of a running process"] = info.value.code
    plain = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(CheckpointError) as info:
            ckpt.lock(plain.pid, 1000)  # no CUDA in it
        codes["lock of a process without CUDA"] = info.value.code
        msg_no_cuda = str(info.value)
    finally:
        plain.kill()
        plain.wait()
    with pytest.raises(CheckpointError) as info:
        ckpt.lock(2**22 + 12345, 1000)  # no such process
    codes["lock of a missing pid"] = info.value.code
    print("\nCODES", codes, "\nMESSAGE", msg_no_cuda)
    assert all(code != 0 for code in codes.values())
    assert ckpt.state(child.pid) == ProcessState.RUNNING, "refused calls leave the process as it was"
    assert child.ask("CHECK").startswith("OK")


def test_lock_times_out_while_a_kernel_runs(child: Child, ckpt: CudaCheckpointer) -> None:
    """A lock waits for the CUDA work in flight up to its timeout, then fails with
    CUDA_ERROR_NOT_READY (600) and leaves the process running and intact: what the H100 and the
    H200 answered (bench/results/*-gpu-tests.log), and what the scheduler's unwind relies on."""
    assert child.proc.stdin is not None
    child.proc.stdin.write("BUSY\n")
    child.proc.stdin.flush()
    assert child.read() == "BUSY"  # the ~3 s kernel is launched (the launch returns at once)
    with pytest.raises(CheckpointError) as info:
        ckpt.lock(child.pid, 200)
    print(f"\nLOCK TIMEOUT: {info.value}")
    assert info.value.code == 600
    assert ckpt.state(child.pid) == ProcessState.RUNNING
    assert child.ask("CHECK").startswith("OK")


def test_checkpointer_reports_itself() -> None:
    from jupyter_swapserve.gpu.checkpoint import make_checkpointer

    c = make_checkpointer(True)
    assert c.kind == "cuda-driver", "the driver on this GPU host has the checkpoint API"
    assert os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""

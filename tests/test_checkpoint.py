"""The checkpoint layer without a GPU: imports, the no-op checkpointer, the ctypes error path
(through a stand-in for libcuda), and the guard that keeps a hung driver call from hanging."""

from __future__ import annotations

import asyncio
import ctypes
import threading

import pytest

from jupyter_swapserve.gpu import checkpoint as ck
from jupyter_swapserve.gpu.monitor import GpuMonitor


class FakeDriver:
    """Stands in for libcuda: the checkpoint functions return the configured CUresult."""

    def __init__(self, results: dict[str, int] | None = None, state: int = 0) -> None:
        self.results = results or {}
        self.calls: list[tuple[str, int]] = []
        self._state = state

    def cuInit(self, flags: int) -> int:
        return self.results.get("cuInit", 0)

    def _fn(self, name: str):
        def call(pid: ctypes.c_int, args: object) -> int:
            self.calls.append((name, pid.value))
            return self.results.get(name, 0)
        return call

    def __getattr__(self, name: str):
        if name.startswith("cuCheckpointProcess") and name != "cuCheckpointProcessGetState":
            return self._fn(name)
        raise AttributeError(name)

    def cuCheckpointProcessGetState(self, pid: ctypes.c_int, out: object) -> int:
        ctypes.cast(out, ctypes.POINTER(ctypes.c_int))[0] = self._state
        return self.results.get("cuCheckpointProcessGetState", 0)

    @staticmethod
    def _set(out: object, text: bytes) -> None:
        ctypes.cast(out, ctypes.POINTER(ctypes.c_char_p))[0] = text

    def cuGetErrorName(self, rc: int, out: object) -> int:
        self._set(out, {801: b"CUDA_ERROR_NOT_SUPPORTED", 909: b"CUDA_ERROR_TIMEOUT"}.get(rc, b"CUDA_ERROR_X"))
        return 0

    def cuGetErrorString(self, rc: int, out: object) -> int:
        self._set(out, b"operation not supported" if rc == 801 else b"some error")
        return 0


def test_no_checkpointer_is_a_noop() -> None:
    c = ck.NoCheckpointer()
    for call in (c.checkpoint, c.restore, c.unlock):
        call(123)
    c.lock(123, 5)
    assert c.state(123) == ck.ProcessState.RUNNING
    assert c.kind == "none" and not c.available


def test_make_checkpointer_without_gpu_is_noop() -> None:
    assert isinstance(ck.make_checkpointer(False), ck.NoCheckpointer)


def test_lock_args_layout_matches_cuda_h() -> None:
    # CUcheckpointLockArgs is 64 bytes: timeoutMs, reserved0, reserved1[7]
    assert ctypes.sizeof(ck._LockArgs) == 64
    assert ck._LockArgs.timeoutMs.offset == 0


def test_calls_reach_the_driver_in_order() -> None:
    drv = FakeDriver(state=2)
    c = ck.CudaCheckpointer(drv)
    c.lock(42, 500)
    c.checkpoint(42)
    assert c.state(42) == ck.ProcessState.CHECKPOINTED
    c.restore(42)
    c.unlock(42)
    assert [n for n, _ in drv.calls] == ["cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
                                         "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock"]
    assert all(pid == 42 for _, pid in drv.calls)


def test_error_names_the_call_the_code_and_the_cause() -> None:
    c = ck.CudaCheckpointer(FakeDriver({"cuCheckpointProcessCheckpoint": 801}))
    with pytest.raises(ck.CheckpointError) as info:
        c.checkpoint(7)
    err = info.value
    assert (err.step, err.pid, err.code) == ("checkpoint", 7, 801)
    text = str(err)
    assert "cuCheckpointProcessCheckpoint(pid=7)" in text
    assert "CUDA_ERROR_NOT_SUPPORTED" in text and "operation not supported" in text
    assert "managed/UVM memory" in text  # the hint says what to do about it


@pytest.mark.parametrize("code", [600, 909])  # 600 is what the H100's driver returns
def test_lock_timeout_is_explained(code: int) -> None:
    c = ck.CudaCheckpointer(FakeDriver({"cuCheckpointProcessLock": code}))
    with pytest.raises(ck.CheckpointError, match="lock timed out"):
        c.lock(7, 1)


def test_target_without_cuda_and_missing_pid_are_explained() -> None:
    c = ck.CudaCheckpointer(FakeDriver({"cuCheckpointProcessLock": 3}))
    with pytest.raises(ck.CheckpointError, match="has not initialised CUDA"):
        c.lock(7, 100)
    c = ck.CudaCheckpointer(FakeDriver({"cuCheckpointProcessLock": 304}))
    with pytest.raises(ck.CheckpointError, match="could not reach the process"):
        c.lock(7, 100)


def test_init_failure_is_a_checkpoint_error() -> None:
    c = ck.CudaCheckpointer(FakeDriver({"cuInit": 100}))
    with pytest.raises(ck.CheckpointError, match="no CUDA device is visible to the server"):
        c.unlock(1)


def test_unknown_state_value_is_an_error() -> None:
    c = ck.CudaCheckpointer(FakeDriver(state=17))
    with pytest.raises(ck.CheckpointError, match="unknown process state 17"):
        c.state(3)


def test_driver_without_the_api_is_refused() -> None:
    class Old:
        def cuInit(self, flags: int) -> int:
            return 0

    with pytest.raises(OSError, match="550 or newer"):
        ck.CudaCheckpointer(Old())


async def test_run_guarded_gives_up_on_a_hung_call() -> None:
    release = threading.Event()
    try:
        with pytest.raises(ck.CheckpointTimeout, match="did not return within") as info:
            await ck.run_guarded("restore", 9, release.wait, 30, timeout=0.2)
        assert info.value.step == "restore" and info.value.pid == 9
    finally:
        release.set()  # let the thread end


async def test_run_guarded_passes_results_and_errors_through() -> None:
    assert await ck.run_guarded("state", 1, lambda: 5, timeout=5) == 5
    c = ck.CudaCheckpointer(FakeDriver({"cuCheckpointProcessRestore": 401}))
    with pytest.raises(ck.CheckpointError, match="not in the state"):
        await ck.run_guarded("restore", 4, c.restore, 4, timeout=5)
    await asyncio.sleep(0)


def test_monitor_without_gpu_is_virtual() -> None:
    from jupyter_swapserve.config import DeviceConfig

    m = GpuMonitor([DeviceConfig(virtual=True, memory_gib=8)])
    assert not m.has_gpu
    assert m.gpu_pids([1, 2]) == []
    assert m.used_gib(0) is None

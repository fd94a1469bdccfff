"""NVIDIA's transparent CUDA checkpoint, driven in-process through the driver API.

``cuCheckpointProcessLock/Checkpoint/Restore/Unlock/GetState`` move all of a process's device
memory to host memory and back without the process's help. Order matters (design.md §2):
swap-out is lock → checkpoint → freeze; swap-in is thaw → restore → unlock. Restoring a
frozen (SIGSTOPped) process hangs forever, so callers must thaw first.

Without a GPU (CI, laptops, Binder) :class:`NoCheckpointer` is used and every call is a no-op,
which the UI reports honestly as a virtual device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from enum import IntEnum


class CheckpointError(RuntimeError):
    """A driver checkpoint call failed. ``step`` is lock/checkpoint/restore/unlock/state."""

    def __init__(self, step: str, pid: int, code: int, message: str) -> None:
        self.step, self.pid, self.code = step, pid, code
        super().__init__(f"cuCheckpointProcess{step.capitalize()}(pid={pid}) failed: {message} (CUresult {code})")


class ProcessState(IntEnum):
    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3


class _LockArgs(ctypes.Structure):
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


class NoCheckpointer:
    """Used on virtual devices: there is no device memory to move."""

    kind = "none"
    available = False

    def lock(self, pid: int, timeout_ms: int = 10_000) -> None:
        pass

    def checkpoint(self, pid: int) -> None:
        pass

    def restore(self, pid: int) -> None:
        pass

    def unlock(self, pid: int) -> None:
        pass

    def state(self, pid: int) -> ProcessState:
        return ProcessState.RUNNING


class CudaCheckpointer:
    """The driver API through ctypes on ``libcuda.so.1``. Calls block: run them in a thread."""

    kind = "cuda-driver"

    def __init__(self, library: str | None = None) -> None:
        name = library or ctypes.util.find_library("cuda") or "libcuda.so.1"
        self._lib = ctypes.CDLL(name)  # OSError when there is no driver: callers fall back
        for fn in ("cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
                   "cuCheckpointProcessUnlock", "cuCheckpointProcessGetState"):
            if not hasattr(self._lib, fn):
                raise OSError(f"driver has no {fn} (needs CUDA driver 550 or newer)")
        self._init_lock = threading.Lock()
        self._initialised = False
        self.available = True

    def _init(self) -> None:
        with self._init_lock:
            if not self._initialised:
                rc = self._lib.cuInit(0)
                if rc != 0:
                    raise CheckpointError("init", 0, rc, self._error_string(rc))
                self._initialised = True

    def _error_string(self, rc: int) -> str:
        text = ctypes.c_char_p()
        if self._lib.cuGetErrorString(rc, ctypes.byref(text)) == 0 and text.value:
            return text.value.decode()
        return "unknown error"

    def _call(self, step: str, fn_name: str, pid: int, args: object | None = None) -> None:
        self._init()
        fn = getattr(self._lib, fn_name)
        rc = fn(ctypes.c_int(pid), ctypes.byref(args) if args is not None else None)
        if rc != 0:
            raise CheckpointError(step, pid, rc, self._error_string(rc))

    def lock(self, pid: int, timeout_ms: int = 10_000) -> None:
        args = _LockArgs()
        args.timeoutMs = timeout_ms
        self._call("lock", "cuCheckpointProcessLock", pid, args)

    def checkpoint(self, pid: int) -> None:
        self._call("checkpoint", "cuCheckpointProcessCheckpoint", pid)

    def restore(self, pid: int) -> None:
        self._call("restore", "cuCheckpointProcessRestore", pid)

    def unlock(self, pid: int) -> None:
        self._call("unlock", "cuCheckpointProcessUnlock", pid)

    def state(self, pid: int) -> ProcessState:
        self._init()
        value = ctypes.c_int()
        rc = self._lib.cuCheckpointProcessGetState(ctypes.c_int(pid), ctypes.byref(value))
        if rc != 0:
            raise CheckpointError("state", pid, rc, self._error_string(rc))
        return ProcessState(value.value)


def make_checkpointer(want_gpu: bool) -> CudaCheckpointer | NoCheckpointer:
    """The driver checkpointer when a GPU is in use and the driver has the API, else the no-op."""
    if not want_gpu:
        return NoCheckpointer()
    try:
        return CudaCheckpointer()
    except OSError:
        return NoCheckpointer()

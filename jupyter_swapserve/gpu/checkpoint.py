"""NVIDIA's transparent CUDA checkpoint, driven in-process through the driver API.

``cuCheckpointProcessLock/Checkpoint/Restore/Unlock/GetState`` move all of a process's device
memory to host memory and back without the process's help. Order matters (design.md §2):
swap-out is lock → checkpoint → freeze; swap-in is thaw → restore → unlock. Restoring a
frozen (SIGSTOPped) process hangs forever, since the driver runs a thread inside the target,
so callers must thaw first; :func:`run_guarded` keeps a hung call from hanging its caller.

Without a GPU (CI, laptops, Binder) :class:`NoCheckpointer` is used and every call is a no-op,
which the UI reports honestly as a virtual device.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable
from enum import IntEnum
from typing import Any

log = logging.getLogger(__name__)

# CUresult values the checkpoint calls return, with what they mean for a swap (cuda.h names).
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_OPERATING_SYSTEM = 304
CUDA_ERROR_ILLEGAL_STATE = 401
CUDA_ERROR_NOT_FOUND = 500
CUDA_ERROR_NOT_READY = 600
CUDA_ERROR_NOT_PERMITTED = 800
CUDA_ERROR_NOT_SUPPORTED = 801
CUDA_ERROR_TIMEOUT = 909
CUDA_ERROR_UNKNOWN = 999

# Seen on the H100 (driver 580.159, tests/gpu/test_gpu_checkpoint.py): restore or unlock of a
# running process → 401; lock of a process that never initialised CUDA → 3; lock of a pid that does
# not exist → 304; lock while a kernel runs past timeoutMs → 600 (not 909).
_HINTS: dict[int, str] = {
    CUDA_ERROR_INVALID_VALUE: "no such process, or it has no CUDA context",
    CUDA_ERROR_OUT_OF_MEMORY: "not enough host memory for the checkpoint, or device memory for the restore",
    CUDA_ERROR_NOT_INITIALIZED: "the process has not initialised CUDA: there is nothing to checkpoint in it",
    CUDA_ERROR_NO_DEVICE: "no CUDA device is visible to this process",
    CUDA_ERROR_OPERATING_SYSTEM: "the driver could not reach the process (it exited, or the pid is wrong)",
    CUDA_ERROR_ILLEGAL_STATE: "the process is not in the state this step needs (e.g. restore of a running process)",
    CUDA_ERROR_NOT_FOUND: "the process has no CUDA state to act on",
    CUDA_ERROR_NOT_READY: "the lock timed out: a CUDA call in the engine did not finish in time",
    CUDA_ERROR_NOT_PERMITTED: "not permitted (another user's process, or missing privileges)",
    CUDA_ERROR_NOT_SUPPORTED: "the process uses something the checkpoint cannot move "
                              "(managed/UVM memory, IPC handles, MPS, ...)",
    CUDA_ERROR_TIMEOUT: "the lock timed out: a CUDA call in the engine did not finish in time",
}
# cuInit failing in this (the controlling) process means something else than in a target process
_INIT_HINTS = {CUDA_ERROR_NOT_INITIALIZED: "the CUDA driver could not be initialised in the server process",
               CUDA_ERROR_NO_DEVICE: "no CUDA device is visible to the server process"}


class CheckpointError(RuntimeError):
    """A driver checkpoint call failed. ``step`` is lock/checkpoint/restore/unlock/state/init."""

    def __init__(self, step: str, pid: int, code: int, message: str) -> None:
        self.step, self.pid, self.code = step, pid, code
        hint = (_INIT_HINTS if step == "init" else _HINTS).get(code)
        detail = f"{message} (CUresult {code})" + (f": {hint}" if hint else "")
        super().__init__(f"cuCheckpointProcess{step.capitalize()}(pid={pid}) failed: {detail}")


class CheckpointTimeout(CheckpointError):
    """A driver call did not return in time (it is left running in its thread)."""

    def __init__(self, step: str, pid: int, seconds: float) -> None:
        RuntimeError.__init__(self, f"cuCheckpointProcess{step.capitalize()}(pid={pid}) did not return within "
                                    f"{seconds:g} s (is the process frozen? restore needs it thawed)")
        self.step, self.pid, self.code = step, pid, CUDA_ERROR_TIMEOUT


class ProcessState(IntEnum):
    """``CUprocessState``."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3


class _LockArgs(ctypes.Structure):
    # CUcheckpointLockArgs: unsigned int timeoutMs; unsigned int reserved0; cuuint64_t reserved1[7]
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
    FUNCTIONS = ("cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
                 "cuCheckpointProcessUnlock", "cuCheckpointProcessGetState")

    def __init__(self, library: str | Any | None = None) -> None:
        if library is None or isinstance(library, str):
            name = library or ctypes.util.find_library("cuda") or "libcuda.so.1"
            self._lib = ctypes.CDLL(name)  # OSError when there is no driver: callers fall back
        else:
            self._lib = library  # a stand-in with the same functions (tests)
        for fn in self.FUNCTIONS:
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
        """The driver's name and text for a CUresult (``CUDA_ERROR_X: text``)."""
        parts = []
        for fn_name in ("cuGetErrorName", "cuGetErrorString"):
            fn = getattr(self._lib, fn_name, None)
            if fn is None:
                continue
            text = ctypes.c_char_p()
            try:
                if fn(rc, ctypes.byref(text)) == 0 and text.value:
                    parts.append(text.value.decode(errors="replace"))
            except (OSError, ctypes.ArgumentError):
                pass
        return ": ".join(parts) if parts else "unknown error"

    def _call(self, step: str, fn_name: str, pid: int, args: ctypes.Structure | None = None) -> None:
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
        value = ctypes.c_int(-1)
        rc = self._lib.cuCheckpointProcessGetState(ctypes.c_int(pid), ctypes.byref(value))
        if rc != 0:
            raise CheckpointError("state", pid, rc, self._error_string(rc))
        try:
            return ProcessState(value.value)
        except ValueError:
            raise CheckpointError("state", pid, CUDA_ERROR_UNKNOWN, f"unknown process state {value.value}") from None


async def run_guarded(step: str, pid: int, call: Callable[..., Any], *args: Any, timeout: float) -> Any:
    """Run a blocking driver call in a thread and give up waiting after ``timeout`` seconds.

    The thread cannot be stopped and is left behind; the caller unwinds or fails the engine,
    and stopping the engine's process is what makes the driver call return.
    """
    try:
        return await asyncio.wait_for(asyncio.to_thread(call, *args), timeout)
    except asyncio.TimeoutError:
        raise CheckpointTimeout(step, pid, timeout) from None


def make_checkpointer(want_gpu: bool) -> CudaCheckpointer | NoCheckpointer:
    """The driver checkpointer when a GPU is in use and the driver has the API, else the no-op."""
    if not want_gpu:
        return NoCheckpointer()
    try:
        return CudaCheckpointer()
    except OSError as exc:
        log.warning("CUDA checkpoint unavailable (%s): engines will be frozen but keep their GPU memory", exc)
        return NoCheckpointer()

"""The allocation interposer's client: the service's side of the control socket.

The interposer (``interposer/``, a C library loaded into the engine with ``LD_PRELOAD``) backs every
device allocation of an engine with memory it can release while keeping the virtual addresses, and
serves a Unix socket named by ``SWAPSERVE_INTERPOSER_SOCKET`` in the engine's environment. Over it
the service asks for ``status``, ``prepare`` (pin the staging now), ``sleep`` (copy out to pinned
host memory, release the device memory) and ``wake`` (re-create, re-map at the same addresses, copy
back). Each answer is one JSON line; sleep and wake list their steps with seconds, and a failed one
says which step failed and whether it was undone (it always is, unless the engine is reported
``broken``, whose only way back is a restart). docs/interposer.md has the whole story.

Only the engine's own uid may talk to the socket: it lives in a 0700 directory of the service's
user (:func:`prepare_socket_dir`), is created 0600, and the library checks each peer's uid.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the engine's environment variable naming the control socket
SOCKET_ENV = "SWAPSERVE_INTERPOSER_SOCKET"
#: where the library is, when not in this checkout's interposer/build
LIBRARY_ENV = "SWAPSERVE_INTERPOSER_LIBRARY"
LIBRARY_NAME = "libswapserve_interposer.so"
_REPO_LIBRARY = Path(__file__).resolve().parents[2] / "interposer" / "build" / LIBRARY_NAME
#: the longest path a Unix socket address holds (sun_path, less its terminating NUL)
MAX_SOCKET_PATH = 107
#: one answer may be long (the status of an engine with thousands of allocations)
_LINE_LIMIT = 1 << 22


class InterposerError(RuntimeError):
    """The interposer refused, could not be reached, or a sleep/wake failed (``failed_step``)."""

    def __init__(self, message: str, *, op: str = "", failed_step: str | None = None, undone: bool = True,
                 state: str | None = None, steps: list[StepTiming] | None = None) -> None:
        super().__init__(message)
        self.op = op
        self.failed_step = failed_step
        #: False only when the library could not undo a failed step (its state is then "broken")
        self.undone = undone
        self.state = state
        self.steps = steps or []


class InterposerUnavailable(InterposerError):
    """Nothing serves the socket: the engine did not load the library, has not allocated device
    memory yet (the library starts serving at the first allocation), or has exited."""


@dataclass(frozen=True)
class StepTiming:
    step: str
    seconds: float


@dataclass(frozen=True)
class SwapResult:
    """What a sleep, wake or prepare did."""

    op: str
    state: str
    bytes: int
    allocations: int
    seconds: float
    steps: list[StepTiming]
    #: the engine already was in the asked-for state
    noop: bool = False

    def step_seconds(self, step: str) -> float:
        return sum(s.seconds for s in self.steps if s.step == step)


@dataclass(frozen=True)
class CaptureProblem:
    """Memory the library could not capture (managed memory, memory pools, imported handles...)."""

    kind: str
    live: bool
    count: int
    bytes: int
    seen: int
    detail: str


@dataclass(frozen=True)
class InterposerStatus:
    pid: int
    state: str  # awake | asleep | broken
    capturable: bool
    problems: list[CaptureProblem]
    #: allocations a sleep releases, and how many of their bytes are released now
    captured_count: int
    captured_bytes: int
    released_bytes: int
    #: device memory the library knows of that a sleep keeps (small, exported, partly mapped...)
    resident_bytes: int
    staging_bytes: int
    staging_chunks: int
    chunk_bytes: int
    #: pinned chunks allocated over the engine's life (stays put once the staging is big enough)
    chunk_allocations: int
    pin_seconds: float
    sleeps: int
    wakes: int
    failures: int
    broken: str | None = None
    hooks: dict[str, int] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def capture_problem(self) -> str | None:
        """Why this engine cannot be swapped through the interposer (then: the checkpoint path),
        or None when it can."""
        if self.state == "broken":
            return f"the interposer is broken: {self.broken}"
        live = [p for p in self.problems if p.live]
        if live:
            return "the interposer cannot capture: " + "; ".join(
                f"{p.detail} ({p.count} allocation{'s' if p.count != 1 else ''}, {p.bytes} bytes)" for p in live)
        if self.captured_count == 0:
            return "the interposer captured no device allocation (the engine allocates in a way it does not see)"
        return None


def _steps(data: dict[str, Any]) -> list[StepTiming]:
    return [StepTiming(str(s["step"]), float(s["seconds"])) for s in data.get("steps", [])]


def _status(data: dict[str, Any]) -> InterposerStatus:
    cap, res, stg, cyc = data["captured"], data["resident"], data["staging"], data["cycles"]
    return InterposerStatus(
        pid=int(data["pid"]), state=str(data["state"]), capturable=bool(data["capturable"]),
        problems=[CaptureProblem(str(p["kind"]), bool(p["live"]), int(p["count"]), int(p["bytes"]), int(p["seen"]),
                                 str(p["detail"])) for p in data["problems"]],
        captured_count=int(cap["count"]), captured_bytes=int(cap["bytes"]), released_bytes=int(cap["released_bytes"]),
        resident_bytes=int(res["bytes"]), staging_bytes=int(stg["bytes"]), staging_chunks=int(stg["chunks"]),
        chunk_bytes=int(stg["chunk_bytes"]), chunk_allocations=int(stg["chunk_allocations"]),
        pin_seconds=float(stg["pin_seconds"]), sleeps=int(cyc["sleeps"]), wakes=int(cyc["wakes"]),
        failures=int(cyc["failures"]), broken=data.get("broken"), hooks={k: int(v) for k, v in data["hooks"].items()},
        raw=data)


class InterposerClient:
    """Talks to one engine's interposer. Each request is one short connection (the library serves
    one at a time), bounded by ``timeout`` seconds; a sleep or wake of a big engine takes as long
    as its copies (16 GB at PCIe speed: a third of a second; pinning a first staging: seconds)."""

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float = 300.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    async def request(self, op: str) -> dict[str, Any]:
        """One request; the answer as sent (``ok`` false included). Raises only when the socket
        cannot be reached or the answer is not one JSON object."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path, limit=_LINE_LIMIT), timeout=min(self.timeout, 10.0))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise InterposerUnavailable(
                f"no interposer serves {self.socket_path} ({e.strerror}): the engine has not loaded it, has not "
                "allocated device memory yet, or has exited", op=op) from None
        except PermissionError:
            raise InterposerError(f"permission denied on {self.socket_path}", op=op) from None
        except TimeoutError:
            raise InterposerUnavailable(f"connecting to {self.socket_path} timed out", op=op) from None
        except OSError as e:  # e.g. a path longer than a socket address holds
            raise InterposerError(f"cannot connect to {self.socket_path}: {e}", op=op) from None
        try:
            writer.write((json.dumps({"op": op}) + "\n").encode())
            try:
                await writer.drain()
            except ConnectionError:
                pass  # a refusing library answers and closes at once: its answer is still to be read
            line = await asyncio.wait_for(reader.readline(), timeout=self.timeout)
        except TimeoutError:
            raise InterposerError(f"{op}: no answer from the interposer in {self.timeout:.0f} s", op=op) from None
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise InterposerError(f"{op}: the interposer's connection broke ({e})", op=op) from None
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
        if not line:
            raise InterposerError(f"{op}: the interposer closed the connection without an answer", op=op)
        try:
            data = json.loads(line)
        except ValueError:
            raise InterposerError(f"{op}: the interposer's answer is not JSON: {line[:200]!r}", op=op) from None
        if not isinstance(data, dict) or "ok" not in data:
            raise InterposerError(f"{op}: unexpected answer {line[:200]!r}", op=op)
        return data

    async def _checked(self, op: str) -> dict[str, Any]:
        data = await self.request(op)
        if not data["ok"]:
            step = data.get("failed_step")
            where = f" at step {step}" if step else ""
            undone = bool(data.get("undone", True))
            tail = "" if not step else (" (undone)" if undone else " (NOT undone: the engine needs a restart)")
            raise InterposerError(f"interposer {op} failed{where}: {data.get('error', 'unknown error')}{tail}",
                                  op=op, failed_step=step, undone=undone, state=data.get("state"),
                                  steps=_steps(data))
        return data

    async def status(self) -> InterposerStatus:
        return _status(await self._checked("status"))

    async def _swap(self, op: str) -> SwapResult:
        d = await self._checked(op)
        return SwapResult(op=op, state=str(d["state"]), bytes=int(d["bytes"]), allocations=int(d["allocations"]),
                          seconds=float(d["seconds"]), steps=_steps(d), noop=bool(d.get("noop", False)))

    async def sleep(self) -> SwapResult:
        """Sync, copy every captured allocation to pinned host memory, release the device memory."""
        return await self._swap("sleep")

    async def wake(self) -> SwapResult:
        """Re-create and re-map every released allocation at its address, copy its bytes back."""
        return await self._swap("wake")

    async def prepare(self) -> SwapResult:
        """Pin the staging for the engine's current allocations now, so the first sleep is fast."""
        return await self._swap("prepare")

    async def release_staging(self) -> SwapResult:
        return await self._swap("release_staging")

    async def wait_serving(self, timeout: float) -> InterposerStatus:
        """The status once the engine serves the socket; InterposerUnavailable after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                return await self.status()
            except InterposerUnavailable:
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.05)


def library_path() -> Path:
    """The built library: $SWAPSERVE_INTERPOSER_LIBRARY, or this checkout's interposer/build."""
    configured = os.environ.get(LIBRARY_ENV)
    path = Path(configured) if configured else _REPO_LIBRARY
    if not path.is_file():
        raise InterposerUnavailable(
            f"the interposer library {path} is not built (bash scripts/build-interposer.sh builds it)")
    return path


def prepare_socket_dir(directory: str | os.PathLike[str]) -> Path:
    """Makes ``directory`` a 0700 directory of this user (the library refuses any other) and
    returns the socket path in it. A stale socket from an earlier engine is removed."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise InterposerError(f"{d} is not a directory of uid {os.geteuid()}: refusing to put a control socket there")
    os.chmod(d, 0o700)  # mkdir's mode goes through the umask; exist_ok keeps an old mode
    sock = d / "interposer.sock"
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise InterposerError(f"the control socket's path {sock} is longer than {MAX_SOCKET_PATH} bytes "
                              "(a Unix socket's limit): use a shorter directory (XDG_RUNTIME_DIR)")
    if sock.is_socket():
        sock.unlink()
    return sock


def engine_env(socket_path: str | os.PathLike[str], library: str | os.PathLike[str],
               base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables that load the library into an engine and name its socket (an LD_PRELOAD the
    engine already has is kept, after ours)."""
    preload = str(library)
    existing = (base or {}).get("LD_PRELOAD", "")
    if existing:
        preload = f"{preload}:{existing}"
    return {"LD_PRELOAD": preload, SOCKET_ENV: str(socket_path)}


__all__ = ["LIBRARY_ENV", "SOCKET_ENV", "CaptureProblem", "InterposerClient", "InterposerError",
           "InterposerStatus", "InterposerUnavailable", "StepTiming", "SwapResult", "engine_env", "library_path",
           "prepare_socket_dir"]

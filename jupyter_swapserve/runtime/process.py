"""An engine as a plain child process: its own process group and, where the cgroup v2 freezer
is usable, its own cgroup. Freeze/thaw through ``cgroup.freeze``; SIGSTOP/SIGCONT of the group
otherwise."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import signal
import tempfile
import time
import weakref
from pathlib import Path

from ..engines.base import LaunchSpec
from . import procfs
from .gate import EngineGate, GateError, ensure_private_dir, open_gate

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[ProcessRuntime] = weakref.WeakSet()


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the server dies without a clean shutdown (even by
    SIGKILL, when no atexit handler runs). Linux only; elsewhere a no-op."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class RuntimeStepError(RuntimeError):
    """A runtime step failed (process gone, freeze refused, ...)."""


def cgroup2_mount(mounts_file: str = "/proc/self/mounts") -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or, on hybrid layouts,
    ``/sys/fs/cgroup/unified``), or None."""
    try:
        with open(mounts_file) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "cgroup2":
                    return Path(parts[1])
    except OSError:
        return None
    return None


def own_cgroup(cgroup_file: str = "/proc/self/cgroup") -> str:
    """This process's path in the v2 hierarchy (the ``0::`` line)."""
    try:
        with open(cgroup_file) as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return "/"


def _remove_stale_cgroups(base: Path) -> None:
    """Empty cgroups left by servers that were killed outright (their engines died with them).
    rmdir only succeeds on an empty cgroup, so nothing that still runs is touched."""
    for stale in base.glob("swapserve-*"):
        pid = stale.name.removeprefix("swapserve-")
        if not pid.isdigit() or procfs.exists(int(pid)):
            continue
        for child in stale.iterdir():
            if child.is_dir():
                with contextlib.suppress(OSError):
                    child.rmdir()
        with contextlib.suppress(OSError):
            stale.rmdir()


def freezer_parent() -> Path | None:
    """A directory under which per-engine cgroups with a working ``cgroup.freeze`` can be made."""
    mount = cgroup2_mount()
    if mount is None:
        return None
    base = mount / own_cgroup().lstrip("/")
    _remove_stale_cgroups(base)
    parent = base / f"swapserve-{os.getpid()}"
    try:
        parent.mkdir(exist_ok=True)
    except OSError:
        return None
    if not (parent / "cgroup.freeze").exists():
        with contextlib.suppress(OSError):
            parent.rmdir()
        return None
    return parent


class ProcessRuntime:
    """One engine process. Not reusable across restarts: make a new one per start."""

    kind = "process"

    def __init__(self, name: str, log_dir: Path | None = None) -> None:
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self.cgroup: Path | None = None
        self.freezer = "none"
        self.frozen = False
        self._log_dir = log_dir or Path(tempfile.gettempdir()) / "jupyter-swapserve"
        self.log_path: Path | None = None
        self.gate: EngineGate | None = None
        _LIVE.add(self)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self, spec: LaunchSpec) -> None:
        try:  # engines' logs hold prompts and errors: owner-only, like their sockets
            ensure_private_dir(self._log_dir)
            self.gate = await open_gate(spec)
        except (GateError, OSError) as exc:
            raise RuntimeStepError(str(exc)) from None
        self.log_path = self._log_dir / f"{self.name}.log"
        parent = freezer_parent()
        argv = list(spec.argv)
        if parent is not None:
            self.cgroup = parent / f"{self.name}-{time.monotonic_ns()}"
            try:
                self.cgroup.mkdir()
            except OSError:
                self.cgroup = None
        if self.cgroup is not None:
            # the child moves itself into its cgroup before exec, so every thread and child
            # it ever has is inside; if the move fails it still runs, with the signal freezer
            argv = ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" 2>/dev/null; exec "$@"', str(self.cgroup), *argv]
        env = {**os.environ, **spec.env}
        log_file = open(self.log_path, "ab")  # noqa: ASYNC230 - a local file, handed to the child
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                env=env, start_new_session=True, preexec_fn=die_with_parent,
            )
        except OSError as exc:
            self.remove_cgroup()
            self._close_gate()
            raise RuntimeStepError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from None
        finally:
            log_file.close()
        self.freezer = "signal"
        if self.cgroup is not None:
            await asyncio.sleep(0)  # the move happens in the child before exec; check it did
            for _ in range(50):
                if str(self.proc.pid) in self._cgroup_procs():
                    self.freezer = "cgroup"
                    break
                await asyncio.sleep(0.01)
        log.info("started %s pid=%s freezer=%s", self.name, self.proc.pid, self.freezer)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    def pids(self) -> list[int]:
        """Every process of the engine (its cgroup, else its process group)."""
        if self.freezer == "cgroup":
            return [int(p) for p in self._cgroup_procs()]
        if self.pid is None:
            return []
        return procfs.group_members(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    # ---- freezer ---------------------------------------------------------------------------
    async def freeze(self) -> None:
        if not self.running:
            raise RuntimeStepError("process is not running")
        if self.freezer == "cgroup":
            assert self.cgroup is not None
            (self.cgroup / "cgroup.freeze").write_text("1")
            # the write returns before every task has stopped: wait for the kernel to say so
            for _ in range(500):
                if "frozen 1" in (self.cgroup / "cgroup.events").read_text():
                    break
                await asyncio.sleep(0.002)
            else:
                (self.cgroup / "cgroup.freeze").write_text("0")
                raise RuntimeStepError("cgroup did not report frozen within 1 s")
        else:
            os.killpg(self.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        self.frozen = True

    async def thaw(self) -> None:
        if self.freezer == "cgroup":
            assert self.cgroup is not None
            (self.cgroup / "cgroup.freeze").write_text("0")
            for _ in range(500):
                if "frozen 0" in (self.cgroup / "cgroup.events").read_text():
                    break
                await asyncio.sleep(0.002)
        elif self.running:
            os.killpg(self.pid, signal.SIGCONT)  # type: ignore[arg-type]
        self.frozen = False

    # ---- stop ------------------------------------------------------------------------------
    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.running:
            with contextlib.suppress(OSError, RuntimeStepError):
                await self.thaw()  # a frozen process cannot act on SIGTERM
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                self.kill()
                await self.proc.wait()
        self.kill()  # strays that left the group but stayed in the cgroup
        self.remove_cgroup()

    def _close_gate(self) -> None:
        if self.gate is not None:
            self.gate.close()

    def kill(self) -> None:
        """Synchronous last resort: SIGKILL the group and everything in the cgroup."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.cgroup is not None and self.cgroup.exists():
            if (self.cgroup / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (self.cgroup / "cgroup.kill").write_text("1")
            else:
                for pid in self._cgroup_procs():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
        self._close_gate()

    def _cgroup_procs(self) -> list[str]:
        if self.cgroup is None:
            return []
        try:
            return (self.cgroup / "cgroup.procs").read_text().split()
        except OSError:
            return []

    def remove_cgroup(self) -> None:
        if self.cgroup is None:
            return
        for _ in range(50):
            try:
                self.cgroup.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)  # the last task is still leaving
        with contextlib.suppress(OSError):
            self.cgroup.parent.rmdir()  # the per-server parent, once it is empty


@atexit.register
def _kill_all_at_exit() -> None:
    # if the server exits without a clean shutdown, leave no engine behind
    for runtime in list(_LIVE):
        runtime.kill()
        runtime.remove_cgroup()

"""The process runtime with real processes: its own group and cgroup, freeze/thaw, no orphans."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from jupyter_swapserve.engines.base import LaunchSpec
from jupyter_swapserve.runtime.process import ProcessRuntime, cgroup2_mount, own_cgroup

from .waiting import until

TICKER = "import time, sys\nwhile True:\n    print(time.monotonic(), flush=True)\n    time.sleep(0.02)\n"


def test_cgroup2_mount_is_detected_from_mounts(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n")
    assert cgroup2_mount(str(mounts)) == Path("/sys/fs/cgroup/unified")
    mounts.write_text("proc /proc proc rw 0 0\n")
    assert cgroup2_mount(str(mounts)) is None
    cg = tmp_path / "cgroup"
    cg.write_text("4:memory:/x\n0::/user.slice/session-1.scope\n")
    assert own_cgroup(str(cg)) == "/user.slice/session-1.scope"


def alive(pid: int) -> bool:
    """True for a live process; a zombie (killed, not yet reaped by init) does not count."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _lines(runtime: ProcessRuntime) -> int:
    assert runtime.log_path is not None
    return len(runtime.log_path.read_text().splitlines())


def _stopped(pid: int) -> bool:
    """The kernel's account: the process is stopped (SIGSTOP) or frozen by its cgroup."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except FileNotFoundError:
        return False


async def _check_freeze_stops_progress(runtime: ProcessRuntime, log_dir: Path) -> None:
    """Frozen, the ticker makes no progress while a second, unfrozen ticker (the clock) ticks 25
    times; thawed, it ticks again. No sleeps: every wait is on a line count or a process state."""
    await until(lambda: _lines(runtime) > 3, "the ticker ticks")
    await runtime.freeze()
    if runtime.freezer == "signal":  # SIGSTOP lands a moment after kill() returns
        await until(lambda: all(_stopped(p) for p in runtime.pids()), "the ticker stopped")
    # (the cgroup freezer's freeze() returns once the kernel reports the cgroup frozen)
    frozen_at = _lines(runtime)
    clock = ProcessRuntime("clock", log_dir=log_dir)
    await clock.start(LaunchSpec(argv=[sys.executable, "-c", TICKER], port=0))
    try:
        await until(lambda: _lines(clock) >= 25, "the clock ticked 25 times")
    finally:
        await clock.stop(timeout=5)
    assert _lines(runtime) == frozen_at, "a frozen engine must not make progress"
    await runtime.thaw()
    await until(lambda: _lines(runtime) > frozen_at, "the thawed ticker ticks again")


async def test_freeze_thaw_and_stop(tmp_path: Path) -> None:
    runtime = ProcessRuntime("ticker", log_dir=tmp_path)
    await runtime.start(LaunchSpec(argv=[sys.executable, "-c", TICKER], port=0))
    pid = runtime.pid
    assert pid is not None and runtime.running
    assert os.getpgid(pid) == pid  # its own process group
    if cgroup2_mount() is not None and runtime.cgroup is not None:
        assert runtime.freezer == "cgroup"
        assert runtime.pids() == [pid]
    await _check_freeze_stops_progress(runtime, tmp_path)
    # a frozen engine still stops cleanly (it is thawed first)
    await runtime.freeze()
    cgroup = runtime.cgroup
    await runtime.stop(timeout=5)
    assert not runtime.running
    assert not alive(pid)
    if cgroup is not None:
        assert not cgroup.exists()


async def test_signal_freezer_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jupyter_swapserve.runtime.process.freezer_parent", lambda: None)
    runtime = ProcessRuntime("ticker-sig", log_dir=tmp_path)
    await runtime.start(LaunchSpec(argv=[sys.executable, "-c", TICKER], port=0))
    assert runtime.freezer == "signal"
    assert runtime.pids() == [runtime.pid]
    await _check_freeze_stops_progress(runtime, tmp_path)
    await runtime.stop(timeout=5)
    assert not runtime.running


async def test_children_of_the_engine_are_stopped_too(tmp_path: Path) -> None:
    script = ("import subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {TICKER!r}])\n"
              "time.sleep(60)\n")
    runtime = ProcessRuntime("parent", log_dir=tmp_path)
    await runtime.start(LaunchSpec(argv=[sys.executable, "-c", script], port=0))
    await until(lambda: len(runtime.pids()) == 2, "the engine and its child")
    pids = runtime.pids()
    await runtime.stop(timeout=5)
    await until(lambda: not any(alive(pid) for pid in pids), "the engine and its child gone", timeout=10)


async def test_start_failure_is_a_clear_error(tmp_path: Path) -> None:
    from jupyter_swapserve.runtime.process import RuntimeStepError

    runtime = ProcessRuntime("missing", log_dir=tmp_path)
    if runtime.cgroup is None and cgroup2_mount() is None:
        with pytest.raises(RuntimeStepError, match="cannot start"):
            await runtime.start(LaunchSpec(argv=["/nonexistent/engine"], port=0))
    else:
        # with the cgroup wrapper the shell starts and exec fails: the process exits at once
        await runtime.start(LaunchSpec(argv=["/nonexistent/engine"], port=0))
        assert await asyncio.wait_for(runtime.wait(), 5) != 0
        await runtime.stop()

"""The /proc readers (runtime/procfs.py) on this machine's real /proc, with real child processes,
and on a hand-made /proc tree for what a live system cannot stage (a command name with spaces and
parentheses, a process that vanishes between the listing and the read)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from jupyter_swapserve.runtime import procfs


def test_a_child_and_its_grandchild_are_descendants_of_this_process() -> None:
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); " \
           "time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while len(procfs.descendants(child.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        below = procfs.descendants(child.pid)
        assert below[0] == child.pid and len(below) == 2
        mine = procfs.descendants(os.getpid())
        assert mine[0] == os.getpid() and set(below) <= set(mine)
        # the child leads its own process group (start_new_session): both are its members
        assert sorted(procfs.group_members(child.pid)) == sorted(below)
        assert procfs.start_ticks(child.pid) is not None and procfs.exists(child.pid)
    finally:
        os.killpg(child.pid, 9)
        child.wait()
    assert procfs.stat_fields(child.pid) is None and procfs.start_ticks(child.pid) is None
    assert not procfs.exists(child.pid)


def test_resident_memory_and_age_of_this_process() -> None:
    assert procfs.rss_bytes([os.getpid()]) > 10 * 2**20  # a Python interpreter with pytest loaded
    assert procfs.rss_bytes([os.getpid(), 2**22 + 7]) == procfs.rss_bytes([os.getpid()])  # no such PID
    assert 0 < procfs.process_age() < 24 * 3600


def fake_proc(root: Path, pid: int, comm: str, ppid: int, pgrp: int, start: int) -> None:
    (root / str(pid)).mkdir(parents=True)
    fields = ["S", str(ppid), str(pgrp)] + ["0"] * 16 + [str(start)] + ["0"] * 5
    (root / str(pid) / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    (root / str(pid) / "statm").write_text("100 25 0 0 0 0 0\n")


def test_a_command_name_with_spaces_and_parentheses_and_a_vanished_process(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, "engine", 1, 10, 500)
    fake_proc(tmp_path, 11, "a (weird) name) x", 10, 10, 501)
    fake_proc(tmp_path, 12, "grandchild", 11, 12, 502)
    (tmp_path / "13").mkdir()  # listed, but gone before its stat could be read
    (tmp_path / "self").mkdir()
    assert procfs.descendants(10, tmp_path) == [10, 11, 12]
    assert procfs.start_ticks(11, tmp_path) == "501"
    assert sorted(procfs.group_members(10, tmp_path)) == [10, 11]
    assert procfs.rss_bytes([10, 11, 13], tmp_path) == 2 * 25 * procfs.PAGE_SIZE

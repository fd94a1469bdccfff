"""What the service reads from /proc, in one place: process stat fields, process trees and
resident memory. Every reader tolerates a process that vanishes mid-read (it is skipped or
reported as unknown): processes come and go between listing /proc and opening their files.

Stdlib only, so the reference engine (a separate program) can use it too."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from pathlib import Path

PROC = Path("/proc")
PAGE_SIZE = 4096


def stat_fields(pid: int | str, proc: Path = PROC) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name, or None when the process is gone.

    The command name may hold spaces and parentheses, so the fields follow its last ')'. Index 0
    is stat(5)'s field 3 (state): ppid is [1], pgrp [2], starttime [19]."""
    try:
        return (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int | str, proc: Path = PROC) -> str | None:
    """The kernel's start time of a process (clock ticks since boot): with the PID, it names one
    process for good, so a reused PID is not mistaken for a live one."""
    fields = stat_fields(pid, proc)
    return fields[19] if fields and len(fields) > 19 else None


def exists(pid: int, proc: Path = PROC) -> bool:
    return (proc / str(pid)).exists()


def pids(proc: Path = PROC) -> list[int]:
    """Every process ID listed in /proc."""
    return [int(entry.name) for entry in proc.iterdir() if entry.name.isdigit()]


def _field(pid: int, index: int, proc: Path) -> int | None:
    fields = stat_fields(pid, proc)
    with contextlib.suppress(TypeError, ValueError, IndexError):
        return int(fields[index])  # type: ignore[index]
    return None


def descendants(root: int, proc: Path = PROC) -> list[int]:
    """``root`` first, then every process below it (by parent PID), from one walk over /proc."""
    children: dict[int, list[int]] = {}
    for pid in pids(proc):
        ppid = _field(pid, 1, proc)
        if ppid is not None:
            children.setdefault(ppid, []).append(pid)
    found, todo = [root], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def group_members(pgid: int, proc: Path = PROC) -> list[int]:
    """The processes of process group ``pgid``."""
    return [pid for pid in pids(proc) if _field(pid, 2, proc) == pgid]


def rss_bytes(processes: list[int] | tuple[int, ...], proc: Path = PROC) -> int:
    """Resident host memory of processes (those gone meanwhile count nothing)."""
    total = 0
    for pid in processes:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((proc / str(pid) / "statm").read_text().split()[1]) * PAGE_SIZE
    return total


def process_age(pid: int | str = "self", proc: Path = PROC) -> float:
    """Seconds since a process was created (for this one, the interpreter's start included)."""
    try:
        ticks = int(start_ticks(pid, proc) or "")
        uptime = float((proc / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))


def tcp_socket_uid(local: tuple[str, int], remote: tuple[str, int], proc: Path = PROC) -> int | None:
    """The user owning the IPv4 TCP socket of this network namespace whose own address is
    ``local`` and whose peer is ``remote`` (``/proc/net/tcp``), or None when there is none. On
    loopback both ends are this host's sockets: the other end of an accepted connection says
    which local user opened it."""
    def address(field: str) -> tuple[str, int]:
        host, port = field.split(":")
        return socket.inet_ntoa(struct.pack("=I", int(host, 16))), int(port, 16)

    with contextlib.suppress(OSError):
        with open(proc / "net" / "tcp") as f:
            next(f, None)  # the header
            for line in f:
                fields = line.split()
                if len(fields) > 7 and address(fields[1]) == local and address(fields[2]) == remote:
                    return int(fields[7])
    return None


def environ(pid: int, proc: Path = PROC) -> dict[str, str] | None:
    """A process's environment as it was started; None when it is gone or not ours to read (another
    user's process, for a service that is not root)."""
    try:
        raw = (proc / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def boot_id(proc: Path = PROC) -> str:
    """This machine's boot: the same for every process of one host (containers included), different
    on another host, so it tells whether two programs can see the same processes and GPUs."""
    try:
        return (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


def owner_uid(pid: int, proc: Path = PROC) -> int | None:
    """The real user id a process runs as; None when it is gone."""
    try:
        for line in (proc / str(pid) / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None

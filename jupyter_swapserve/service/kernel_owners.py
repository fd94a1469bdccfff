"""The channels over which the shared service asks users' servers to act on their own kernels.

The service decides, the owner acts. A user's server opens a channel with its own hub token
(``GET /swapserve/api/kernel-commands``, server-sent events: the service never connects to a user's
server); the service puts a command on it — swap this kernel out, or restore it — and waits for
the owner's answers (``POST /swapserve/api/kernel-commands/<id>``): ``started`` within the answer
timeout, then ``done`` or ``failed`` within a bound that grows with the memory to move
(:func:`work_timeout`). An owner that does not answer in time is given up on: the caller picks
another victim, and the command's deadline (on the event) tells a late owner not to act any more.

Invariant: every command ends exactly once — the owner's last answer, a timeout, or the close of
the channel it was put on — and an answer for a command that has ended, or from another user,
changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .steps import StepTiming

#: seconds per GiB an owner is given for a checkpoint or restore beyond the answer timeout
#: (the driver moves ≥ 1.5 GB/s on the H100 and H200, design.md §2: a sixfold margin)
SECONDS_PER_GIB = 4.0
WORK_FLOOR_S = 30.0


def work_timeout(gib: float) -> float:
    """How long an owner that said ``started`` may take to finish moving ``gib``."""
    return WORK_FLOOR_S + SECONDS_PER_GIB * max(0.0, gib)


class OwnerUnreachable(RuntimeError):
    """The owning server could not be asked, or did not answer in time. ``sent``: whether the
    command reached its channel (then the owner may still act on it, until its deadline)."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class NotYourCommand(PermissionError):
    """An answer for a command of another user's kernel."""


@dataclass(frozen=True)
class Command:
    id: str
    kernel_id: str
    action: str  # "swap-out" | "swap-in"
    reason: str
    #: wall-clock time after which the owner must not start on it any more (the service gave up
    #: waiting for its ``started``): a server that was stopped and resumes does not act on old news
    deadline: float

    def as_event(self) -> dict[str, Any]:
        return {"id": self.id, "kernel_id": self.kernel_id, "action": self.action, "reason": self.reason,
                "deadline": self.deadline}


@dataclass(frozen=True)
class OwnerAnswer:
    """The owner's last word on a command."""

    ok: bool
    error: str | None = None
    #: the steps the owner ran (lock, checkpoint, restore, unlock), timed
    steps: tuple[StepTiming, ...] = ()
    #: the processes it checkpointed (swap-out)
    pids: tuple[int, ...] = ()
    #: the owner refused because a cell is running in the kernel
    busy: bool = False
    #: how many swaps the owner has done of this kernel, this one included (orders its reports)
    moves: int = 0


@dataclass
class _Pending:
    user: str
    server: str
    command: Command
    channel: OwnerChannel
    started: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    done: asyncio.Future[OwnerAnswer] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class OwnerChannel:
    """One open command channel of one server: the commands waiting to be sent on it."""

    def __init__(self, user: str, server: str, serial: int) -> None:
        self.user, self.server, self.serial = user, server, serial
        self.queue: asyncio.Queue[Command] = asyncio.Queue()
        self.closed = False
        self.opened_at = time.time()

    async def next(self, timeout: float) -> Command | None:
        """The next command to send, or None after ``timeout`` (time for a keep-alive)."""
        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(self.queue.get(), timeout)
        return None


class OwnerChannels:
    """Every open channel, by (user, server), and the commands in flight."""

    def __init__(self) -> None:
        self.channels: dict[tuple[str, str], list[OwnerChannel]] = {}
        self.pending: dict[str, _Pending] = {}
        self._serial = itertools.count(1)

    def open(self, user: str, server: str) -> OwnerChannel:
        """A server connects; the newest channel of a server is the one its commands go to."""
        channel = OwnerChannel(user, server, next(self._serial))
        self.channels.setdefault((user, server), []).append(channel)
        return channel

    def close(self, channel: OwnerChannel) -> None:
        """The connection ended: the commands put on it and not yet answered end as unanswered."""
        channel.closed = True
        open_ = [c for c in self.channels.get((channel.user, channel.server), []) if c is not channel]
        if open_:
            self.channels[(channel.user, channel.server)] = open_
        else:
            self.channels.pop((channel.user, channel.server), None)
        for pending in [p for p in self.pending.values() if p.channel is channel]:
            self._end(pending, OwnerUnreachable(f"the server '{pending.server or 'default'}' of {pending.user} "
                                                f"closed its command channel", sent=True))

    def connected(self, user: str, server: str) -> bool:
        return bool(self.channels.get((user, server)))

    async def ask(self, user: str, server: str, kernel_id: str, action: str, reason: str, *,
                  answer_timeout: float, gib: float) -> OwnerAnswer:
        """Put a command on the server's channel and wait for its end: the owner's answer, or
        :class:`OwnerUnreachable` (no channel, no ``started`` within ``answer_timeout``, no end
        within :func:`work_timeout` after it)."""
        channels = self.channels.get((user, server))
        if not channels:
            raise OwnerUnreachable(f"the server '{server or 'default'}' of {user} has no command channel open",
                                   sent=False)
        command = Command(secrets.token_hex(8), kernel_id, action, reason, time.time() + answer_timeout)
        pending = _Pending(user, server, command, channels[-1])
        self.pending[command.id] = pending
        channels[-1].queue.put_nowait(command)
        try:
            await asyncio.wait_for(asyncio.shield(pending.started), answer_timeout)
            return await asyncio.wait_for(asyncio.shield(pending.done), work_timeout(gib))
        except asyncio.TimeoutError:
            said = "did not finish" if pending.started.done() else "did not answer"
            raise OwnerUnreachable(f"the server '{server or 'default'}' of {user} {said} the {action} of kernel "
                                   f"{kernel_id} in time", sent=True) from None
        finally:
            self.pending.pop(command.id, None)

    def answer(self, user: str, command_id: str, status: str, answer: OwnerAnswer | None = None) -> bool:
        """The owner's answer: ``started``, then ``done`` or ``failed`` (with ``answer``). False
        when the command is not (or no longer) in flight; :class:`NotYourCommand` for another user's."""
        pending = self.pending.get(command_id)
        if pending is None:
            return False
        if pending.user != user:
            raise NotYourCommand(f"command '{command_id}' is not for a kernel of {user}")
        if not pending.started.done():
            pending.started.set_result(None)
        if status != "started":
            self._end(pending, answer or OwnerAnswer(ok=status == "done"))
        return True

    def _end(self, pending: _Pending, outcome: OwnerAnswer | BaseException) -> None:
        for future in (pending.started, pending.done):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            elif future is pending.done:
                future.set_result(outcome)
            else:
                future.set_result(None)
        for future in (pending.started, pending.done):
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: no "never retrieved" warning for an abandoned command

    def close_all(self) -> None:
        for channels in list(self.channels.values()):
            for channel in list(channels):
                self.close(channel)

"""Users' servers and the shared service: kernel reports, the command channel and its answers.

    POST /swapserve/api/kernel-reports          a server's report of its kernels (a lease)
    GET  /swapserve/api/kernel-commands?server= the server's command channel (server-sent events)
    POST /swapserve/api/kernel-commands/<id>    the server's answer: started, then done or failed

Only on the shared service (service/remote_kernels.py; 404 elsewhere), only for a hub *user*'s
token (a server's token is its user's), and only for that user's own kernels: a report that names
another user's kernel or process, or an answer to a command of another user's kernel, is a 403.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tornado.iostream import StreamClosedError

from ..service.kernel_owners import NotYourCommand, OwnerAnswer
from ..service.remote_kernels import KernelReport, RemoteKernels, ReportRefused, ServerReport
from ..service.steps import StepTiming
from .base import OpenAIError, SwapServeHandler

KEEPALIVE = 15.0
MAX_KERNELS = 256
MAX_PIDS = 4096
ANSWERS = ("started", "done", "failed")


class OwnerHandler(SwapServeHandler):
    @property
    def remote(self) -> RemoteKernels:
        kernels = self.settings.get("swapserve_kernels")
        if not isinstance(kernels, RemoteKernels):
            raise OpenAIError(404, "kernel reports are taken by the shared swap service of a JupyterHub only "
                                   "(this server runs its own kernels, or kernel tenancy is off)",
                              code="kernel_reports_not_taken")
        return kernels

    def owner(self) -> str:
        """The user the token belongs to: a server acts for its own user's kernels only."""
        self.require_user("write")
        hub_user = getattr(self.current_user, "hub_user", None)
        if isinstance(hub_user, dict) and hub_user.get("kind", "user") != "user":
            raise OpenAIError(403, "only a user's server reports and swaps kernels (this token is a "
                                   f"{hub_user.get('kind')}'s)", code="forbidden")
        return self.identity().name


class KernelReportHandler(OwnerHandler):
    async def post(self) -> None:
        user = self.owner()
        remote = self.remote
        body = self.read_json()
        report = ServerReport(user, text(body, "server", 255), text(body, "host", 255), kernel_reports(body))
        try:
            self.finish(remote.report(report))
        except ReportRefused as exc:
            raise OpenAIError(403, str(exc), param="kernels", code="forbidden") from None


class KernelCommandsHandler(OwnerHandler):
    def on_connection_close(self) -> None:
        if getattr(self, "_task", None) is not None:
            self._task.cancel()

    async def get(self) -> None:
        user = self.owner()
        remote = self.remote
        server = self.get_argument("server", "")
        if len(server) > 255:
            raise OpenAIError(400, "server: at most 255 characters", param="server", code="invalid_value")
        self._task = asyncio.current_task()
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        channel = remote.owners.open(user, server)
        remote.notifier.notify()  # its kernels can be moved again
        try:
            self.write("event: ready\ndata: {}\n\n")
            await self.flush()
            while True:
                command = await channel.next(KEEPALIVE)
                self.write(f"event: command\ndata: {json.dumps(command.as_event())}\n\n" if command is not None
                           else ": keepalive\n\n")
                await self.flush()
        except (StreamClosedError, asyncio.CancelledError):
            return
        finally:
            remote.owners.close(channel)
            remote.notifier.notify()


class KernelAnswerHandler(OwnerHandler):
    async def post(self, command_id: str) -> None:
        user = self.owner()
        remote = self.remote
        body = self.read_json()
        status = body.get("status")
        if status not in ANSWERS:
            raise OpenAIError(400, f"status: one of {', '.join(ANSWERS)}", param="status", code="invalid_value")
        try:
            taken = remote.owners.answer(user, command_id, status, owner_answer(body, status))
        except NotYourCommand as exc:
            raise OpenAIError(403, str(exc), param="command_id", code="forbidden") from None
        if not taken:
            raise OpenAIError(404, f"no command '{command_id}' is waiting for an answer (it ended already)",
                              param="command_id", code="command_not_found")
        self.finish({"command": command_id, "taken": status})


# ---- validation: each field named in the error --------------------------------------------------
def _bad(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{param}: {message}", param=param, code="invalid_value")


def text(body: dict[str, Any], key: str, limit: int, param: str | None = None) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise _bad(param or key, f"a string of at most {limit} characters")
    return value


def number(body: dict[str, Any], key: str, param: str) -> float:
    value = body.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e12:
        raise _bad(param, "a number ≥ 0")
    return float(value)


def count(body: dict[str, Any], key: str, param: str) -> int:
    value = body.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
        raise _bad(param, "a whole number ≥ 0")
    return value


def flag(body: dict[str, Any], key: str, param: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise _bad(param, "true or false")
    return value


def kernel_reports(body: dict[str, Any]) -> tuple[KernelReport, ...]:
    raw = body.get("kernels")
    if not isinstance(raw, list) or len(raw) > MAX_KERNELS:
        raise _bad("kernels", f"a list of at most {MAX_KERNELS} kernels")
    out = []
    for i, k in enumerate(raw):
        at = f"kernels[{i}]"
        if not isinstance(k, dict):
            raise _bad(at, "an object")
        kernel_id = text(k, "kernel_id", 128, f"{at}.kernel_id")
        if not kernel_id or "/" in kernel_id:
            raise _bad(f"{at}.kernel_id", "a kernel id (no '/')")
        pids = k.get("pids")
        if (not isinstance(pids, list) or not 0 < len(pids) <= MAX_PIDS
                or not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 2**31 for p in pids)):
            raise _bad(f"{at}.pids", f"a list of 1 to {MAX_PIDS} process ids")
        out.append(KernelReport(
            kernel_id=kernel_id, path=text(k, "path", 4096, f"{at}.path"), pids=tuple(pids),
            start=text(k, "start", 32, f"{at}.start"), busy=flag(k, "busy", f"{at}.busy"),
            last_execution=number(k, "last_execution", f"{at}.last_execution"),
            resident=flag(k, "resident", f"{at}.resident", default=True), gib=number(k, "gib", f"{at}.gib"),
            pinned=flag(k, "pinned", f"{at}.pinned"), moves=count(k, "moves", f"{at}.moves")))
    return tuple(out)


def owner_answer(body: dict[str, Any], status: str) -> OwnerAnswer | None:
    if status == "started":
        return None
    steps = body.get("steps") or []
    pids = body.get("pids") or []
    if not isinstance(steps, list) or not all(
            isinstance(s, dict) and isinstance(s.get("step"), str) and isinstance(s.get("seconds"), (int, float))
            for s in steps):
        raise _bad("steps", "a list of {step, seconds, ok}")
    if not isinstance(pids, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in pids):
        raise _bad("pids", "a list of process ids")
    error = body.get("error")
    return OwnerAnswer(ok=status == "done", error=str(error)[:2000] if error else None,
                       steps=tuple(StepTiming(s["step"][:64], float(s["seconds"]), bool(s.get("ok", True)))
                                   for s in steps[:64]),
                       pids=tuple(pids[:MAX_PIDS]), busy=body.get("busy") is True, moves=count(body, "moves", "moves"))

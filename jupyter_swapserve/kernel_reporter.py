"""A user's server under JupyterHub: its notebook kernels as GPU tenants of the shared swap service.

The service decides, the owner acts. This server watches its kernels (:class:`.kernel_watch.KernelWatcher`,
as a standalone server does), measures what each holds (NVML; host memory as the stand-in on a
virtual device), and every ``interval`` seconds reports those that hold GPU memory to each node
service the hub lists (``POST /swapserve/api/kernel-reports``, with this server's own hub token:
each node books the kernels whose processes it sees, the others answer "elsewhere"). The report is a
lease: a server that stops reporting loses its bookings (service/remote_kernels.py).

It keeps a command channel open to each node (``GET /swapserve/api/kernel-commands``, server-sent
events: no connection is ever made *to* a user's server) and does what the service asks, answering
``started`` and then ``done`` or ``failed`` (``POST /swapserve/api/kernel-commands/<id>``):

    swap-out: lock → checkpoint each GPU process of the kernel      (never a freeze; refused while busy)
    swap-in:  restore → unlock                                      (only when the service has reserved)

A cell sent to a checkpointed kernel is held by the kernel websocket (kernel_connection.py) while
this server asks the node for the kernel's memory (``POST /swapserve/api/kernels/<id>/swap-in``): the
service queues the reservation like any request, evicting by its policy, and then commands the
restore; the held messages are delivered once the node answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .gpu.monitor import GpuMonitor
from .runtime.procfs import boot_id, start_ticks
from .service.kernels import BUSY_GRACE_S, KernelFacts, KernelFactsSource, KernelSwapError, measure_processes
from .service.steps import DriverSteps, SwapStepError, SwapSteps

log = logging.getLogger(__name__)

REPORTS, COMMANDS, KERNELS = "swapserve/api/kernel-reports", "swapserve/api/kernel-commands", "swapserve/api/kernels"
RECONNECT_FIRST_S, RECONNECT_MAX_S = 0.5, 10.0
#: a node that does not take kernel reports (kernel tenancy off there) is asked again this much later
NOT_TAKEN_RETRY_S = 60.0


@dataclass
class OwnedKernel:
    """One kernel of this server that holds GPU memory, or whose GPU memory this server checkpointed."""

    kernel_id: str
    path: str
    pids: tuple[int, ...]
    start: str
    device: int
    gib: float
    resident: bool = True
    checkpointed: list[int] = field(default_factory=list)
    busy: bool = False
    last_execution: float = 0.0
    execution_sent_at: float = 0.0
    #: as the service last said (it decides; this server remembers it for a service that restarts)
    pinned: bool = False
    #: the swaps this server has done of it (orders its reports against its answers at the service)
    moves: int = 0
    #: the nodes (their base URLs) that booked it
    booked_by: set[str] = field(default_factory=set)
    transition: asyncio.Lock = field(default_factory=asyncio.Lock)

    def as_report(self) -> dict[str, Any]:
        return {"kernel_id": self.kernel_id, "path": self.path, "pids": list(self.pids), "start": self.start,
                "busy": self.busy, "last_execution": self.last_execution, "resident": self.resident,
                "gib": round(self.gib, 6), "pinned": self.pinned, "moves": self.moves}


class KernelReporter:
    """This server's kernels, reported to the node services and swapped when they say so."""

    def __init__(self, facts: KernelFactsSource, monitor: GpuMonitor, driver: DriverSteps,
                 nodes: Callable[[], list[str]], token: str, server: str, *, virtual: bool = False,
                 interval: float = 2.0) -> None:
        self.facts = facts
        self.monitor = monitor
        self.driver = driver
        #: the base URLs of the node services (each ending in "/")
        self.nodes = nodes
        self.headers = {"Authorization": f"token {token}"}
        self.server = server
        self.virtual = virtual
        self.interval = interval
        self.host = boot_id()
        self.kernels: dict[str, OwnedKernel] = {}
        #: the nodes whose command channel is open now
        self.connected: set[str] = set()
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None))
        self._report_now = asyncio.Event()
        self._reported_some = False
        self._reporting = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listening: dict[str, asyncio.Task[None]] = {}

    # ---- the kernel websocket's side (kernel_connection.KernelGate) ------------------------------
    def tracks(self, kernel_id: str) -> bool:
        return kernel_id in self.kernels

    def begin_execution(self, kernel_id: str) -> bool:
        """An execution is about to reach the kernel: busy from now on (the service hears it at once).
        True when its GPU state must come back first."""
        kernel = self.kernels.get(kernel_id)
        if kernel is None:
            return False
        kernel.busy = True
        kernel.execution_sent_at = kernel.last_execution = time.time()
        self._report_now.set()
        return not kernel.resident or kernel.transition.locked()

    async def swap_in(self, kernel_id: str) -> float:
        """Ask the node that booked the kernel for its memory; it commands the restore (see
        :meth:`act`). Seconds it took; KernelSwapError with the service's reason when refused."""
        kernel = self.kernels.get(kernel_id)
        if kernel is None:
            return 0.0
        if kernel.resident and not kernel.transition.locked():
            return 0.0
        t0 = time.perf_counter()
        for attempt in range(2):
            nodes = sorted(kernel.booked_by) or self.nodes()
            if not nodes:
                raise KernelSwapError("no swap service is known to this server")
            r = await self.client.post(nodes[0] + f"{KERNELS}/{kernel_id}/swap-in", headers=self.headers, content=b"{}")
            if r.status_code == 200:
                return float(r.json().get("seconds") or (time.perf_counter() - t0))
            if r.status_code == 404 and attempt == 0:
                await self.report()  # the node does not know it (yet): report, then ask again
                continue
            raise KernelSwapError(_error_message(r))
        raise KernelSwapError("the swap service does not book this kernel")

    # ---- reports ---------------------------------------------------------------------------------
    def _measure(self, pids: tuple[int, ...]) -> tuple[int, float]:
        return measure_processes(self.monitor, pids, self.virtual)

    def _update(self, facts: list[KernelFacts]) -> None:
        seen = set()
        for f in facts:
            kernel = self.kernels.get(f.kernel_id)
            if kernel is not None and kernel.pids[:1] != f.pids[:1] and not kernel.transition.locked():
                del self.kernels[f.kernel_id]  # restarted: its checkpointed state died with the old process
                kernel = None
            if kernel is None:
                device, gib = self._measure(f.pids)
                if gib <= 0 or not f.pids:
                    continue  # holds no GPU memory: not a tenant
                kernel = OwnedKernel(f.kernel_id, f.path, f.pids, start_ticks(f.pids[0]) or "", device, gib,
                                     last_execution=f.last_execution)
                self.kernels[f.kernel_id] = kernel
            seen.add(f.kernel_id)
            sent = kernel.execution_sent_at
            kernel.path, kernel.pids = f.path, f.pids
            kernel.busy = f.busy or (f.last_execution < sent and time.time() < sent + BUSY_GRACE_S)
            kernel.last_execution = max(kernel.last_execution, f.last_execution)
            if kernel.resident and not kernel.transition.locked():
                kernel.device, kernel.gib = self._measure(f.pids)
            elif not kernel.resident and f.busy:
                # an execution that reached it past the websocket: its CUDA calls wait for the restore
                self._spawn(self._swap_in_logged(f.kernel_id))
        for kernel_id in [k for k in self.kernels if k not in seen]:
            del self.kernels[kernel_id]

    async def report(self) -> None:
        """One report to every node: the kernels that hold GPU memory or are checkpointed here."""
        async with self._reporting:
            self._update(await self.facts.facts())
            kernels = [k.as_report() for k in self.kernels.values() if k.gib > 0 or not k.resident]
            if not kernels and not self._reported_some:
                return  # nothing to book, nothing booked: no report needed
            self._reported_some = bool(kernels)  # once more when the last one is gone, then quiet
            body = {"server": self.server, "host": self.host, "kernels": kernels}
            await asyncio.gather(*(self._report_to(node, body) for node in self.nodes()))

    async def _report_to(self, node: str, body: dict[str, Any]) -> None:
        try:
            r = await self.client.post(node + REPORTS, headers=self.headers, json=body, timeout=15.0)
        except httpx.HTTPError as exc:
            log.debug("kernel report to %s failed: %s", node, exc)
            return
        if r.status_code != 200:
            log.warning("kernel report to %s refused: %s", node, _error_message(r))
            return
        answers = r.json().get("kernels") or {}
        for kernel in self.kernels.values():
            answer = answers.get(kernel.kernel_id) or {}
            if answer.get("booked"):
                kernel.booked_by.add(node)
                kernel.pinned = bool(answer.get("pinned"))
            else:
                kernel.booked_by.discard(node)

    async def _report_loop(self) -> None:
        while True:
            try:
                await self.report()
            except Exception:  # keep reporting: one failed sweep must not end the lease
                log.exception("kernel report failed")
            self._report_now.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._report_now.wait(), self.interval)

    # ---- commands --------------------------------------------------------------------------------
    async def _listen(self, node: str) -> None:
        """Keep the node's command channel open, reconnecting with a growing pause."""
        pause = RECONNECT_FIRST_S
        while True:
            try:
                async with self.client.stream("GET", node + COMMANDS, params={"server": self.server},
                                              headers=self.headers, timeout=httpx.Timeout(15.0, read=60.0)) as r:
                    if r.status_code != 200:
                        await r.aread()
                        log.warning("kernel commands from %s refused: %s", node, _error_message(r))
                        pause = NOT_TAKEN_RETRY_S if r.status_code == 404 else pause
                    else:
                        pause = RECONNECT_FIRST_S
                        await self._take_commands(node, r)
            except (httpx.HTTPError, ValueError) as exc:
                log.debug("kernel command channel to %s: %s", node, exc)
            finally:
                self.connected.discard(node)
            await asyncio.sleep(pause)
            pause = min(RECONNECT_MAX_S, pause * 2) if pause < NOT_TAKEN_RETRY_S else pause

    async def _take_commands(self, node: str, response: httpx.Response) -> None:
        async for name, data in server_sent_events(response.aiter_lines()):
            if name == "ready":
                self.connected.add(node)
                self._report_now.set()
            elif name == "command":
                self._spawn(self.act(node, json.loads(data)))

    async def act(self, node: str, command: dict[str, Any]) -> None:
        """Do what the node asks, and say how it went."""
        url = node + f"{COMMANDS}/{command.get('id')}"
        kernel = self.kernels.get(str(command.get("kernel_id")))
        if time.time() > float(command.get("deadline") or 0):
            result: dict[str, Any] = {"status": "failed", "error": "the command arrived after its deadline"}
        elif kernel is None:
            result = {"status": "failed", "error": "this server has no such kernel with GPU memory (shut down?)"}
        else:
            await self._answer(url, {"status": "started"})
            if command.get("action") == "swap-out":
                result = await self._swap_out_here(kernel)
            elif command.get("action") == "swap-in":
                result = await self._restore_here(kernel)
            else:
                result = {"status": "failed", "error": f"unknown action {command.get('action')!r}"}
        await self._answer(url, result)
        log.info("kernel %s: %s (%s) → %s", command.get("kernel_id"), command.get("action"),
                 command.get("reason"), result.get("error") or result["status"])
        self._report_now.set()

    async def _answer(self, url: str, body: dict[str, Any]) -> None:
        with contextlib.suppress(httpx.HTTPError):
            r = await self.client.post(url, headers=self.headers, json=body, timeout=15.0)
            if r.status_code not in (200, 404):  # 404: the service gave up on it already
                log.warning("answer to %s refused: %s", url, _error_message(r))

    async def _swap_out_here(self, kernel: OwnedKernel) -> dict[str, Any]:
        """lock → checkpoint, never while a cell runs; undone if a step fails."""
        async with kernel.transition:
            if not kernel.resident:
                return {"status": "done", "pids": kernel.checkpointed, "steps": [], "moves": kernel.moves}
            self._update(await self.facts.facts())  # busy or idle as of now
            if kernel.busy:
                return {"status": "failed", "busy": True, "error": "a cell is running in the kernel"}
            pids = [] if self.monitor.all_virtual([kernel.device]) else self.monitor.gpu_pids(list(kernel.pids))
            steps = SwapSteps()
            try:
                await self.driver.checkpoint(steps, pids)
            except SwapStepError as exc:
                return {"status": "failed", "error": str(exc), "steps": timings(steps)}
            kernel.resident, kernel.checkpointed = False, pids
            kernel.moves += 1
            return {"status": "done", "pids": pids, "steps": timings(steps), "moves": kernel.moves}

    async def _restore_here(self, kernel: OwnedKernel) -> dict[str, Any]:
        """restore → unlock (the node has reserved the memory)."""
        async with kernel.transition:
            if kernel.resident:
                return {"status": "done", "steps": [], "moves": kernel.moves}
            steps = SwapSteps()
            try:
                await self.driver.restore(steps, kernel.checkpointed)
            except SwapStepError as exc:
                return {"status": "failed", "error": str(exc), "steps": timings(steps)}
            kernel.resident, kernel.checkpointed = True, []
            kernel.moves += 1
            return {"status": "done", "steps": timings(steps), "moves": kernel.moves}

    async def _swap_in_logged(self, kernel_id: str) -> None:
        try:
            await self.swap_in(kernel_id)
        except (KernelSwapError, httpx.HTTPError) as exc:
            log.warning("kernel %s: swap-in failed: %s", kernel_id, exc)

    # ---- lifecycle -------------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start(self) -> None:
        self._spawn(self._report_loop())
        self._spawn(self._follow_nodes())

    async def _follow_nodes(self) -> None:
        """A command channel to every node the hub lists (a node added later gets one too)."""
        while True:
            for node in self.nodes():
                if node not in self._listening:
                    self._listening[node] = self._spawn(self._listen(node))
            await asyncio.sleep(max(self.interval, 5.0))

    async def close(self) -> None:
        """Server shutdown: restore what this server checkpointed (a kernel that outlives its server
        must not be left without its GPU state; the service books it by measure once the lease ends)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for kernel in self.kernels.values():
            if not kernel.resident and kernel.checkpointed:
                with contextlib.suppress(SwapStepError):
                    await self.driver.restore(SwapSteps(), kernel.checkpointed)
        await self.client.aclose()


def timings(steps: SwapSteps) -> list[dict[str, Any]]:
    return [{"step": t.step, "seconds": t.seconds, "ok": t.ok} for t in steps.timings]


async def server_sent_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event name, data) of each event of a text/event-stream; comments (keep-alives) skipped."""
    name, data = "message", []
    async for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)


def _error_message(r: httpx.Response) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return str(r.json()["error"]["message"])
    return f"HTTP {r.status_code}"

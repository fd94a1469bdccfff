"""The swap service as one object: admit requests, forward them, swap on an admin's request,
report status. Pure asyncio; built by :func:`.factory.build_service`. The Jupyter extension is one
of its users, tests are another."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from ..config import ModelsFile
from ..gpu.monitor import GpuMonitor
from ..runtime import Runtimes
from .accounting import QuotaAccounting, QuotaLease
from .backend import Backend, State
from .events import Notifier
from .identity import ANONYMOUS
from .kernels import KernelTenants
from .placement import EngineUnavailable, Placement
from .quotas import DEFAULT_PRIORITY
from .reservations import ReservationManager
from .scheduler import Scheduler
from .steps import DriverSteps, SwapRecord
from .upstream import Upstream, UpstreamResponse
from .usage import estimate_tokens, prompt_text

log = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    def __init__(self, name: str, available: list[str]) -> None:
        self.name, self.available = name, available
        listed = ", ".join(available) or "none"
        super().__init__(f"The model '{name}' does not exist. Available models: {listed}.")


class QueueFull(RuntimeError):
    def __init__(self, name: str, limit: int) -> None:
        self.retry_after = 5
        super().__init__(f"The queue of model '{name}' is full ({limit} waiting); retry later.")


@dataclass
class Ticket:
    """A request admitted to a model: forwarded while the ticket is held."""

    backend: Backend
    user: str | None
    queue_seconds: float = 0.0
    swap_in_seconds: float = 0.0
    #: the quota lease (None when quotas are off): the response's tokens are recorded on it
    lease: QuotaLease | None = None

    def record_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        if self.lease is not None:
            self.lease.record(prompt_tokens, completion_tokens)


class SwapService:
    """The service's face: admission, forwarding, admin operations, status. Composed by
    :func:`.factory.build_service`, which hands it its parts."""

    def __init__(self, *, models_file: ModelsFile, config_errors: list[str], backends: dict[str, Backend],
                 notifier: Notifier, monitor: GpuMonitor, driver: DriverSteps, record: SwapRecord,
                 placement: Placement, scheduler: Scheduler, kernels: KernelTenants | None,
                 accounting: QuotaAccounting | None, upstream: Upstream, client: httpx.AsyncClient,
                 runtimes: Runtimes, idle_check_interval: float = 1.0) -> None:
        self.models_file = models_file
        self.config_errors = config_errors
        self.backends = backends
        self.notifier = notifier
        self.monitor = monitor
        #: the checkpoint driver's steps (its ``checkpointer`` is the driver itself)
        self.driver = driver
        #: where every swap is recorded; its ``observers`` are told (metrics, event log)
        self.record = record
        self.placement = placement
        self.scheduler = scheduler
        #: notebook kernels as GPU tenants (None: they are not)
        self.kernels = kernels
        #: quotas and usage per user; None: every request is admitted and nothing is counted
        self.accounting = accounting
        self.upstream = upstream
        self.client = client  # the engines' HTTP client (readiness, hooks, token counts)
        self.runtimes = runtimes
        self.metrics: Any = None  # SwapMetrics, when the factory was asked for metrics
        self._idle_interval = idle_check_interval
        self._tasks: list[asyncio.Task[None]] = []
        self._waiting_priorities: dict[str, list[float]] = {}
        self.started_at = time.time()

    @property
    def reservations(self) -> dict[int, ReservationManager]:
        """The reservation manager of each device, by index."""
        return self.placement.managers

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start every engine in the background (startup snapshot), the idle sweeper, the kernel sweeps."""
        self._tasks.append(asyncio.create_task(self._startup_snapshot(), name="swapserve-startup"))
        self._tasks.append(asyncio.create_task(self._idle_loop(), name="swapserve-idle"))
        if self.kernels is not None:
            self.kernels.start()

    async def _startup_snapshot(self) -> None:
        for backend in list(self.backends.values()):
            async with backend.transition:
                if backend.state != State.STOPPED:
                    continue  # a request already started it
                with contextlib.suppress(EngineUnavailable):
                    await self.scheduler.cold_start(backend, snapshot=True)

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self._idle_interval)
            try:
                await self.scheduler.swap_out_idle()
                await self.scheduler.residuals.restore_all()
            except Exception:  # keep sweeping; one bad swap must not end idle handling
                log.exception("idle swap-out failed")

    async def wait_started(self, timeout: float = 600.0) -> None:
        """Wait until every engine has finished its startup (tests, benchmarks, the demo)."""
        if self._tasks:
            await asyncio.wait_for(asyncio.shield(self._tasks[0]), timeout)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.kernels is not None:
            await self.kernels.close()
        await self.scheduler.close()
        await self.client.aclose()
        await self.upstream.close()
        self.runtimes.close()
        if self.accounting is not None:
            self.accounting.close()  # gives back its leases in a shared database

    # ---- requests --------------------------------------------------------------------------
    def backend(self, name: Any) -> Backend:
        if not isinstance(name, str) or name not in self.backends:
            raise ModelNotFound(str(name), sorted(self.backends))
        return self.backends[name]

    @contextlib.asynccontextmanager
    async def admit(self, model: str, user: str | None = None, max_tokens: int | None = None,
                    ) -> AsyncIterator[Ticket]:
        """Check the user's quota, queue for the model (fairly across users), have it swapped in,
        and hold a forwarding slot. Raises QuotaExceeded or QueueFull before anything is queued."""
        backend = self.backend(model)
        user_name = user or ANONYMOUS
        if backend.queued >= backend.config.max_queue:
            raise QueueFull(model, backend.config.max_queue)  # refused before it counts against the user
        lease = self.accounting.admit(user_name, model, max_tokens) if self.accounting is not None else None
        try:
            ticket = Ticket(backend, user, lease=lease)
            async with self._serving(backend, ticket, user_name) as served:
                yield served
        finally:
            if lease is not None:
                lease.release()

    def _waiting(self, backend: Backend, priority: float, add: bool) -> None:
        """Count a waiting request in or out, with its priority: the highest priority among a
        model's waiting requests breaks the policy's ties between models."""
        backend.queued += 1 if add else -1
        waiting = self._waiting_priorities.setdefault(backend.name, [])
        if add:
            waiting.append(priority)
        else:
            waiting.remove(priority)
        backend.queued_priority = max(waiting, default=0.0)
        self.notifier.notify()

    @contextlib.asynccontextmanager
    async def _serving(self, backend: Backend, ticket: Ticket, user_name: str) -> AsyncIterator[Ticket]:
        arrived = time.perf_counter()
        priority = ticket.lease.priority if ticket.lease else DEFAULT_PRIORITY
        self._waiting(backend, priority, add=True)
        admitted = False
        try:
            async with backend.slots.hold(user_name, priority):
                while True:
                    ticket.swap_in_seconds += await self.scheduler.ensure_running(backend)
                    async with backend.rw.read():
                        if backend.state != State.RUNNING:
                            continue  # swapped out between the two steps: go round again
                        admitted = True
                        self._waiting(backend, priority, add=False)
                        backend.in_flight += 1
                        backend.requests_total += 1
                        backend.served_since_swap_in = True
                        backend.last_used = backend.last_request = backend.clock.time()
                        ticket.queue_seconds = max(0.0, time.perf_counter() - arrived - ticket.swap_in_seconds)
                        self.notifier.notify()
                        try:
                            yield ticket
                        finally:
                            backend.in_flight -= 1
                            backend.last_used = backend.last_request = backend.clock.time()
                            self.notifier.notify()
                        return
        finally:
            if not admitted:
                self._waiting(backend, priority, add=False)

    @contextlib.asynccontextmanager
    async def forward(self, ticket: Ticket, path: str, body: dict[str, Any]) -> AsyncIterator[UpstreamResponse]:
        """POST the body to the engine (model name rewritten); the response can be streamed."""
        backend = ticket.backend
        upstream = {**body, "model": backend.adapter.upstream_model_name()}
        if body.get("stream") and backend.adapter.supports_stream_usage:
            # always ask for the usage chunk: the user's tokens are counted whatever the client asked
            upstream["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        async with self.upstream.post(f"{backend.base_url}{path}", json.dumps(upstream).encode(), backend.name,
                                      backend.config.request_timeout) as response:
            yield response

    def max_tokens_limit(self, user: str | None, model: str) -> int | None:
        """The user's max_tokens_per_request on the model (None: no limit, or quotas off)."""
        if self.accounting is None:
            return None
        return self.accounting.limits(user or ANONYMOUS, model).max_tokens_per_request

    async def count_prompt_tokens(self, ticket: Ticket, body: dict[str, Any]) -> int:
        """The prompt's tokens, for engines that do not report usage in a stream: the engine's own
        tokenizer where the adapter can ask it, else an estimate."""
        text = prompt_text(body)
        backend = ticket.backend
        counted = None
        if backend.base_url:
            counted = await backend.adapter.count_tokens(self.client, backend.base_url, text)
        return counted if counted is not None else estimate_tokens(text)

    # ---- admin operations ------------------------------------------------------------------
    async def swap_in(self, name: str) -> float:
        return await self.scheduler.ensure_running(self.backend(name))

    def prefetch(self, name: str, user: str | None = None) -> str:
        """An intent hint (a cell about to ask this model): see Scheduler.prefetch. Raises
        ModelNotFound, or QuotaExceeded when the user's quota excludes the model: a hint moves
        nothing for a model its sender may not call."""
        backend = self.backend(name)
        if self.accounting is not None:
            self.accounting.check_model(user or ANONYMOUS, name)
        return self.scheduler.prefetch(backend)

    async def swap_out(self, name: str) -> bool:
        backend = self.backend(name)
        if backend.config.pinned:
            raise EngineUnavailable(f"model '{name}' is pinned and is never swapped out", retry_after=0)
        return await self.scheduler.swap_out(backend, reason="requested")

    # ---- status ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        devices = []
        for d in self.monitor.devices:
            manager = self.placement.managers[d.index]
            devices.append({
                "index": d.index, "name": d.name, "kind": d.kind, "capacity_gib": d.capacity_gib,
                "reserved_gib": round(manager.granted_gib, 4), "free_gib": round(manager.free_gib, 4),
                "used_gib": self.monitor.used_gib(d.index),
                "waiting": [{"model": o, "gib": g} for o, g, _ in manager.waiting()],
            })
        models = []
        for b in self.backends.values():
            models.append({
                "name": b.name, "engine": b.config.engine, "runtime": b.config.runtime, "api": b.config.api,
                "state": b.state.value, "device": b.device, "devices": b.devices,
                "device_kind": self.monitor.devices[b.device].kind,
                "memory_gib": b.memory_gib, "memory_measured": b.memory_measured,
                "reserved_gib": b.reserved_gib,
                "residual_gib": b.residual_reservation.gib if b.residual_reservation else 0.0,
                "residual": b.config.residual, "swap": b.config.swap, "swap_path": b.adapter.swap_path,
                "queue_depth": b.queued, "in_flight": b.in_flight, "max_queue": b.config.max_queue,
                "pinned": b.config.pinned, "idle_timeout": b.config.idle_timeout,
                "last_swap_in_seconds": b.last_swap_in_seconds,
                "last_swap_out_seconds": b.last_swap_out_seconds,
                "last_cold_start_seconds": b.last_cold_start_seconds,
                "last_used": b.last_used or None,
                "last_request": b.last_request or None,
                "swaps_in": b.swaps_in, "swaps_out": b.swaps_out, "requests": b.requests_total,
                "swap_in_history": [{"t": t, "seconds": s} for t, s in b.swap_in_history],
                "last_steps": [{"step": s.step, "seconds": s.seconds, "ok": s.ok} for s in b.last_steps],
                "freezer": getattr(b.runtime, "freezer", None),
                "pids": b.runtime.pids() if b.runtime is not None and b.runtime.running else [],
                "error": b.error,
            })
        return {
            "version": self.notifier.version,
            "checkpointer": self.driver.checkpointer.kind,
            "devices": devices,
            "models": models,
            "kernels": self.kernels.status() if self.kernels is not None else [],
            "config_errors": self.config_errors,
            "quotas": self.accounting is not None,
        }

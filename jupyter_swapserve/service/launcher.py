"""The process machinery of a model's engine: start it in its runtime, wait until it answers, warm
it up, measure it, watch it, stop it; and the one way an engine fails.

Nothing here decides when: the scheduler (:mod:`.scheduler`) sequences these. Invariant: an engine
that fails or stops gives back everything it holds (reservations, kept residual) and leaves no
process behind; its failure is recorded once, with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

from ..engines.base import free_port
from ..runtime.procfs import rss_bytes
from .backend import Backend
from .placement import EngineUnavailable
from .states import State
from .steps import SwapRecord

log = logging.getLogger(__name__)


class EngineLauncher:
    def __init__(self, monitor: Any, runtime_factory: Callable[[Backend], Any], record: SwapRecord,
                 client: httpx.AsyncClient) -> None:
        self.monitor = monitor
        self.runtime_factory = runtime_factory
        self.record = record
        self.client = client

    async def start(self, backend: Backend, measure: bool) -> None:
        """Start the engine process and wait until it serves (and is warmed up, and measured when
        ``measure``). Raises EngineUnavailable, or what the runtime raises."""
        port = backend.config.port or free_port()
        spec = backend.adapter.launch_spec(port)
        runtime = self.runtime_factory(backend)
        await runtime.start(spec)
        backend.runtime = runtime
        backend.base_url = spec.base_url
        backend.intentional_stop = False
        backend.watcher = asyncio.create_task(self._watch(backend, runtime))
        await self._wait_ready(backend)
        if backend.config.warmup:
            await self._warmup(backend)
        if measure:
            self._measure(backend)

    async def _wait_ready(self, backend: Backend) -> None:
        deadline = time.monotonic() + backend.config.start_timeout
        while time.monotonic() < deadline:
            if backend.runtime is None or not backend.runtime.running:
                raise EngineUnavailable(f"engine exited during start: {self.last_log_line(backend)}")
            if await backend.adapter.is_ready(self.client, backend.base_url or ""):
                return
            await asyncio.sleep(0.2)
        raise EngineUnavailable(f"engine not ready after {backend.config.start_timeout:.0f} s")

    async def _warmup(self, backend: Backend) -> None:
        path, body = backend.adapter.warmup_request()
        try:
            r = await self.client.post(f"{backend.base_url}{path}", json=body, timeout=backend.config.start_timeout)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"warm-up request failed: {exc}") from None
        if r.status_code >= 400:
            raise EngineUnavailable(f"warm-up request got HTTP {r.status_code}: {r.text[:200]}")

    def _measure(self, backend: Backend) -> None:
        pids = backend.runtime.pids()
        if self.monitor.all_virtual(backend.devices):
            size = rss_bytes(pids) / 1024**3  # resident host memory: the measure on a virtual device
        else:
            # an engine spanning devices reserves the same on each: its largest share
            per_device = self.monitor.process_memory_gib(pids)
            size = max((per_device.get(d, 0.0) for d in backend.devices), default=0.0)
        size = max(size, 0.01)
        backend.memory_gib = round(size, 3)
        backend.memory_measured = True
        if backend.reservation is not None:
            backend.reservation.resize(backend.memory_gib)
        log.info("%s measured at %.3f GiB", backend.name, size)

    @staticmethod
    def last_log_line(backend: Backend) -> str:
        tail = backend.runtime.log_tail(30) if backend.runtime else ""
        lines = [ln for ln in tail.splitlines() if ln.strip()]
        return lines[-1][:300] if lines else "no output"

    async def _watch(self, backend: Backend, runtime: Any) -> None:
        code = await runtime.wait()
        if backend.runtime is runtime and not backend.intentional_stop:
            await self.fail(backend, f"engine exited with code {code}: {self.last_log_line(backend)}")

    async def fail(self, backend: Backend, reason: str) -> None:
        """The engine cannot go on: give back everything, stop what is left of it, say why."""
        self.record.failure(backend.name, reason)
        backend.failures += 1
        backend.failed_at = backend.clock.monotonic()
        backend.release_all()
        runtime, backend.runtime = backend.runtime, None
        backend.checkpointed_pids = []
        backend.slept = False
        backend.set_state(State.FAILED, reason)
        if runtime is not None:
            backend.intentional_stop = True
            await runtime.stop()  # also removes the cgroup of a process that already died

    async def stop(self, backend: Backend) -> None:
        runtime, backend.runtime = backend.runtime, None
        backend.intentional_stop = True
        if runtime is not None:
            await runtime.stop()
        if backend.watcher is not None:
            backend.watcher.cancel()
        backend.release_all()
        backend.checkpointed_pids = []
        backend.set_state(State.STOPPED)

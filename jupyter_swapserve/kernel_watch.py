"""The server side of kernel tenancy: each sweep, the facts of this server's kernels (process
tree, user, notebook, busy, last execution) go to :class:`.service.kernels.KernelTenants`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .runtime.procfs import descendants
from .service.kernels import KernelFacts, KernelTenants

log = logging.getLogger(__name__)


def kernel_pid(kernel: Any) -> int | None:
    """The OS process of a kernel started by jupyter_client's local provisioner (None otherwise:
    a remote or gateway kernel is not on this node's GPUs)."""
    provisioner = getattr(kernel, "provisioner", None)
    pid = getattr(provisioner, "pid", None) or getattr(getattr(provisioner, "process", None), "pid", None)
    return int(pid) if pid else None


class KernelWatcher:
    def __init__(self, serverapp: Any, tenants: KernelTenants, user: str, interval: float = 2.0) -> None:
        self.serverapp = serverapp
        self.tenants = tenants
        self.user = user
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def facts(self) -> list[KernelFacts]:
        km = self.serverapp.kernel_manager
        paths: dict[str, str] = {}
        with contextlib.suppress(Exception):
            for session in await self.serverapp.session_manager.list_sessions():
                if session.get("kernel"):
                    paths[session["kernel"]["id"]] = session.get("path") or ""
        result = []
        for kernel_id in list(km.list_kernel_ids()):
            with contextlib.suppress(KeyError):
                kernel = km.get_kernel(kernel_id)
                pid = kernel_pid(kernel)
                if pid is None:
                    continue
                last = getattr(kernel, "last_activity", None)
                result.append(KernelFacts(
                    kernel_id=kernel_id, user=self.user, path=paths.get(kernel_id, ""), pids=tuple(descendants(pid)),
                    busy=getattr(kernel, "execution_state", "") == "busy",
                    last_execution=last.timestamp() if last is not None else 0.0))
        return result

    async def sweep(self) -> None:
        await self.tenants.observe(await self.facts())

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep watching; one bad sweep must not end kernel tenancy
                log.exception("kernel sweep failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="swapserve-kernels")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.tenants.close()

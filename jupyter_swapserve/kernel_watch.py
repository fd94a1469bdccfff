"""The server side of kernel tenancy: the facts of this server's kernels (process tree, user,
notebook, busy, last execution), the source :class:`.service.kernels.KernelTenants` sweeps."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from .runtime.procfs import descendants
from .service.kernels import KernelFacts

log = logging.getLogger(__name__)


def kernel_pid(kernel: Any) -> int | None:
    """The OS process of a kernel started by jupyter_client's local provisioner (None otherwise:
    a remote or gateway kernel is not on this node's GPUs)."""
    provisioner = getattr(kernel, "provisioner", None)
    pid = getattr(provisioner, "pid", None) or getattr(getattr(provisioner, "process", None), "pid", None)
    return int(pid) if pid else None


class KernelWatcher:
    """The kernels of one Jupyter server, all owned by its one user (a :class:`KernelFactsSource`)."""

    def __init__(self, serverapp: Any, user: str) -> None:
        self.serverapp = serverapp
        self.user = user

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

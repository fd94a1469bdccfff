"""A client of a kernel that a Jupyter server started (``POST api/kernels``), from its connection file.

jupyter_client judges a kernel it did not start by its heartbeat alone, and its heartbeat declares the
kernel dead after one ping left unanswered for ``HBChannel.time_to_dead`` (1 s): ``wait_for_ready``
then raises "Kernel died before replying to kernel_info" for a kernel that is alive and only slow, as
a starting kernel is on a loaded machine (its process stopped for just over a second does the same).
The kernel's own server watches its process and says ``execution_state: "dead"`` (or no longer has
it) when it is gone: this client asks it, as JupyterLab does, so a kernel that really dies still
fails the test at once, and a slow one is waited for up to the caller's timeout."""

from __future__ import annotations

import asyncio

import httpx
from jupyter_client import BlockingKernelClient


class ServerKernelClient(BlockingKernelClient):
    """A blocking client alive as long as the kernel's server says it is (see the module's docstring)."""

    kernel_url: str = ""
    headers: dict[str, str] = {}

    def is_alive(self) -> bool:
        r = httpx.get(self.kernel_url, headers=self.headers, timeout=30)
        if r.status_code == 404:
            return False  # the server no longer has it
        r.raise_for_status()
        return r.json()["execution_state"] != "dead"

    async def _async_is_alive(self) -> bool:
        return await asyncio.to_thread(self.is_alive)

    def wait_for_ready(self, timeout: float | None = None) -> None:
        # jupyter_client first waits for a client it did not start to see the kernel alive, up to the
        # timeout; a kernel its server already calls dead is said so at once
        if not self.is_alive():
            raise RuntimeError("Kernel died before replying to kernel_info (its server says it is dead or gone)")
        super().wait_for_ready(timeout)


def connect(connection_file: str, kernel_url: str, headers: dict[str, str], timeout: float = 120) -> ServerKernelClient:
    """The kernel's client, its channels started, once the kernel has answered kernel_info.
    ``kernel_url`` is the kernel's model on its server (``…/api/kernels/<id>``)."""
    client = ServerKernelClient(connection_file=connection_file)
    client.kernel_url, client.headers = kernel_url, headers
    client.load_connection_file()
    client.start_channels()
    client.wait_for_ready(timeout=timeout)
    return client

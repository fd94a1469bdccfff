"""The kernel client the kernel tests use (tests/server_kernel.py), against a real Jupyter server and
real kernels: a kernel whose process stops for a few seconds while the client waits for it (a loaded machine
does that to a starting kernel) is waited for, where jupyter_client's own judgement, its heartbeat,
calls it dead; a kernel that really dies fails the wait at once."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from jupyter_client import BlockingKernelClient

from .server import free_port
from .server_kernel import ServerKernelClient, connect
from .waiting import wait_until

#: longer than the heartbeat's 1 s and its next ping's: the heartbeat has said "dead" before it ends
STALL = 4.0


class Server:
    def __init__(self, url: str, token: str, runtime: Path, proc: subprocess.Popen) -> None:
        self.url, self.runtime, self.proc = url, runtime, proc
        self.headers = {"Authorization": f"token {token}"}

    def start_kernel(self) -> tuple[str, str, psutil.Process]:
        """A new kernel: its id, its connection file, its process."""
        r = httpx.post(self.url + "api/kernels", headers=self.headers, json={"name": "python3"}, timeout=60)
        assert r.status_code == 201, r.text
        kernel_id = r.json()["id"]
        connection_file = self.runtime / f"kernel-{kernel_id}.json"
        found: list[psutil.Process] = []

        def started() -> bool:
            found[:] = [p for p in psutil.Process(self.proc.pid).children()
                        if any(connection_file.name in arg for arg in p.cmdline())]
            return connection_file.exists() and bool(found)
        wait_until(started, f"kernel {kernel_id}'s process and connection file")
        return kernel_id, str(connection_file), found[0]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A plain Jupyter server (no swapserve, no lab): only its kernels are used."""
    home = Path(tempfile.mkdtemp(prefix="swapserve-kernels-"))
    port, token = free_port(), secrets.token_hex(16)
    log = (home / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", f"--port={port}", f"--IdentityProvider.token={token}",
         "--ServerApp.open_browser=False", "--allow-root", f"--ServerApp.root_dir={home}",
         "--ServerApp.jpserver_extensions=jupyter_swapserve=False", "--ServerApp.jpserver_extensions=jupyterlab=False"],
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(home / "runtime")}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    site = Server(f"http://127.0.0.1:{port}/", token, home / "runtime", proc)

    def up() -> bool:
        try:
            return httpx.get(site.url + "api/status", headers=site.headers, timeout=5).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None  # ended: the assertion below says so
    wait_until(up, "the Jupyter server answering", timeout=120)
    assert proc.poll() is None, (home / "server.log").read_text()
    try:
        yield site
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def stop_for(process: psutil.Process, seconds: float) -> threading.Timer:
    """Stops the kernel's process now and lets it go on after ``seconds`` (the stall is the point)."""
    process.suspend()
    resume = threading.Timer(seconds, process.resume)
    resume.start()
    return resume


@pytest.mark.parametrize("judge", ["heartbeat", "server"])
def test_a_kernel_stopped_for_a_moment_is_waited_for(server: Server, judge: str) -> None:
    kernel_id, connection_file, process = server.start_kernel()
    client = BlockingKernelClient(connection_file=connection_file) if judge == "heartbeat" \
        else ServerKernelClient(connection_file=connection_file)
    if isinstance(client, ServerKernelClient):
        client.kernel_url, client.headers = server.url + f"api/kernels/{kernel_id}", server.headers
    client.load_connection_file()
    client.start_channels()
    try:
        wait_until(client.hb_channel.is_beating, "the kernel's first heartbeat")
        stall = stop_for(process, STALL)
        if judge == "heartbeat":
            # jupyter_client's judgement of a kernel it did not start: one ping unanswered for 1 s
            with pytest.raises(RuntimeError, match="Kernel died before replying to kernel_info"):
                client.wait_for_ready(timeout=60)
            stall.join()
            r = httpx.get(server.url + f"api/kernels/{kernel_id}", headers=server.headers, timeout=30)
            assert r.json()["execution_state"] != "dead"  # it was alive all along
        else:
            client.wait_for_ready(timeout=60)
            stall.join()
            msg_id = client.execute("6 * 7")
            # the replies to the kernel_info requests sent while it was stopped come first
            while (reply := client.get_shell_msg(timeout=60))["parent_header"]["msg_id"] != msg_id:
                assert reply["msg_type"] == "kernel_info_reply", reply
            assert reply["content"]["status"] == "ok"
    finally:
        client.stop_channels()
        httpx.delete(server.url + f"api/kernels/{kernel_id}", headers=server.headers, timeout=60)


def test_a_kernel_that_dies_fails_the_wait_at_once(server: Server) -> None:
    kernel_id, connection_file, process = server.start_kernel()
    url = server.url + f"api/kernels/{kernel_id}"
    kept = Path(tempfile.mkdtemp(prefix="swapserve-kernels-")) / "kernel.json"
    kept.write_text(Path(connection_file).read_text())  # the server removes its own copy with the kernel
    httpx.delete(url, headers=server.headers, timeout=60)  # the server shuts it down and forgets it
    process.wait(60)
    # "died", not "didn't respond in 120 seconds": the server's word ends the wait
    with pytest.raises(RuntimeError, match="Kernel died before replying to kernel_info"):
        connect(str(kept), url, server.headers, timeout=120)

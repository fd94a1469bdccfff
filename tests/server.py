"""A real Jupyter server (subprocess) running the swap service, for tests and benchmarks.

Kernels started by it inherit SWAPSERVE_URL/SWAPSERVE_TOKEN, as in real use.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODELS = ROOT / "examples" / "demo.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerHandle:
    url: str  # base URL of the Jupyter server, ending in "/"
    token: str
    proc: subprocess.Popen
    log_path: Path
    root_dir: Path

    @property
    def api(self) -> str:
        return self.url + "swapserve/v1"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def status(self) -> dict:
        r = httpx.get(self.url + "swapserve/api/status", headers=self.headers(), timeout=30)
        r.raise_for_status()
        return r.json()

    def model(self, name: str) -> dict:
        return next(m for m in self.status()["models"] if m["name"] == name)

    def wait_models(self, states: tuple[str, ...] = ("swapped_out", "running"), timeout: float = 300) -> dict:
        """Wait until every model has finished its startup snapshot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status()
            if status["models"] and all(m["state"] in states for m in status["models"]):
                return status
            if any(m["state"] == "failed" for m in status["models"]):
                raise RuntimeError(f"a model failed to start: {status['models']}\n{self.log()}")
            time.sleep(0.2)
        raise TimeoutError(f"models not ready: {self.status()['models']}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


@contextlib.contextmanager
def run_server(models_file: Path | str = DEMO_MODELS, lab: bool = False, extra_args: list[str] | None = None,
               env: dict[str, str] | None = None, root_dir: Path | None = None) -> Iterator[ServerHandle]:
    port = free_port()
    token = secrets.token_hex(16)
    root = root_dir or Path(tempfile.mkdtemp(prefix="swapserve-root-"))
    log_path = Path(tempfile.mkstemp(prefix="swapserve-server-", suffix=".log")[1])
    app = "jupyterlab" if lab else "jupyter_server"
    argv = [sys.executable, "-m", app, "--no-browser", f"--port={port}", "--ip=127.0.0.1",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
            f"--SwapServe.models_file={models_file}", "--ServerApp.port_retries=0", *(extra_args or [])]
    if not any(a.startswith("--SwapServe.quota_db_url") for a in argv):
        # each server its own quota database, unless the test shares one across a restart
        argv.append(f"--SwapServe.quota_db_url=sqlite:///{root}/quotas.sqlite")
    if not any(a.startswith("--SwapServe.event_log") for a in argv):
        argv.append(f"--SwapServe.event_log={root}/events.jsonl")  # each server its own event log
    if os.geteuid() == 0:
        argv.append("--allow-root")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
    handle = ServerHandle(f"http://127.0.0.1:{port}/", token, proc, log_path, root)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyter server exited with {proc.returncode}:\n{handle.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(handle.url + "api/status", headers=handle.headers(), timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter server did not start:\n{handle.log()}")
            time.sleep(0.2)
        yield handle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(20)  # jupyter asks for confirmation on the first SIGINT only with a tty
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

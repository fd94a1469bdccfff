"""Kernels on the shared node (issue 21) with a real CUDA kernel: a user's server (client mode) owns
an IPython kernel holding a few GiB of torch tensors and a captured CUDA graph; the node's shared
service (service mode) books it by NVML beside a model that cannot share the GPU with it. A model
request makes the service ask the user's server to swap the kernel out (the server locks and
checkpoints; NVML shows the memory gone before the service counts it free); the kernel's next cell
is held in the user's server until the service has reserved its memory (evicting the model) and
told the server to restore; tensors and the graph's replay are bit-identical.

The two servers are plain Jupyter servers in service and client mode, the user's server reaching the
service with the service's token as a hub server does with its own: the device machine has no
Node.js for JupyterHub's proxy. Who may do what under a real hub is tests/test_hub_kernels.py's
(CPU, the same code path). One command on a GPU machine:
    python -m pytest -q -s -rA tests/gpu/test_gpu_hub_kernels.py
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..server import ServerHandle, run_server
from ..test_kernels import wait_for
from .test_gpu_kernels import ALLOC_GIB, CHECK, SETUP, kernel_gpu_gib, run_cells
from .test_gpu_swap import server_env

pytestmark = pytest.mark.gpu
USER = "ada"
EMPTY = Path(__file__).resolve().parent.parent / "models" / "empty.yaml"


@dataclass
class SharedNode:
    service: ServerHandle  # the node's shared service (its engines, the books)
    server: ServerHandle  # the user's own server (its kernels)

    def kernel(self, kernel_id: str) -> dict[str, Any] | None:
        """The kernel as the service books it."""
        kernels = self.service.status()["kernels"]
        return next((k for k in kernels if k["kernel_id"] == kernel_id), None)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedNode]:
    util = os.environ.get("SWAPSERVE_KERNEL_TEST_UTIL", "0.93")  # the model and the kernel cannot share the GPU
    models = {"models": [{"name": "gpu-m", "engine": "reference", "model": "shape:llama-3.2-1b", "api": "completion",
                          "args": ["--gpu-memory-utilization", util, "--max-model-len", "1024", "--seed", "0"]}]}
    path = Path(tmp_path_factory.mktemp("gpu-hub-kernels")) / "models.json"
    path.write_text(json.dumps(models))
    common = [f"--SwapServe.local_user={USER}", "--SwapServe.kernel_check_interval=0.5"]
    with run_server(path, env=server_env(), extra_args=["--SwapServe.mode=service", *common]) as service:
        # the user's server: its kernels carry its user (as JupyterHub's spawner sets JUPYTERHUB_USER)
        env = {**server_env(), "JUPYTERHUB_API_TOKEN": service.token, "JUPYTERHUB_USER": USER}
        args = ["--SwapServe.mode=client", f"--SwapServe.upstream_url={service.url}", *common]
        with run_server(EMPTY, env=env, extra_args=args) as server:
            try:
                service.wait_models(timeout=600)
                yield SharedNode(service, server)
            finally:
                print("\nSERVICE LOG TAIL\n" + service.log()[-4000:] + "\nSERVER LOG TAIL\n" + server.log()[-3000:])


def test_a_users_cuda_kernel_yields_to_the_nodes_model_and_comes_back(node: SharedNode) -> None:
    server, service = node.server, node.service
    kernel_id = httpx.post(server.url + "api/kernels", headers=server.headers(), json={"name": "python3"},
                           timeout=60).json()["id"]
    try:
        (ready,) = run_cells(server, kernel_id, [SETUP])
        assert ready and ready[0].startswith("ready"), ready
        booked = wait_for(lambda: (k := node.kernel(kernel_id)) and k["state"] == "resident"
                          and k["reserved_gib"] >= ALLOC_GIB and k["owner"] == "answering" and k, 60,
                          "the service to book the kernel by NVML")
        pid = booked["pids"][0]
        assert kernel_gpu_gib(pid) >= ALLOC_GIB

        t0 = time.perf_counter()
        r = httpx.post(server.url + "swapserve/v1/completions", headers=server.headers(), timeout=600,
                       json={"model": "gpu-m", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        out = node.kernel(kernel_id)
        assert out is not None and out["state"] == "swapped_out", out
        assert out["last_swap_out_reason"] == "preempted for gpu-m"
        assert [s["step"] for s in out["last_steps"]] == ["lock", "checkpoint"]  # the owner's steps, never a freeze
        assert kernel_gpu_gib(pid) < 0.05, "NVML: the kernel's memory left the GPU"
        print(f"\nmodel request evicting the user's idle kernel ({booked['memory_gib']:.2f} GiB) through its "
              f"server: {time.perf_counter() - t0:.3f} s; kernel swap-out {out['last_swap_out_seconds']:.3f} s, "
              f"steps {out['last_steps']}")

        t0 = time.perf_counter()
        (lines,) = run_cells(server, kernel_id, [CHECK])
        back = node.kernel(kernel_id)
        print(f"kernel cell through the user's server, evicting the model: {lines[0].strip()}, round trip "
              f"{time.perf_counter() - t0:.3f} s; steps {back and back['last_steps']}")
        assert lines[0].startswith("GPU state restored in ") and lines[1:] == ["identical\n"], lines
        assert back is not None and back["state"] == "resident" and kernel_gpu_gib(pid) >= ALLOC_GIB
        assert service.model("gpu-m")["state"] == "swapped_out"
        device = service.status()["devices"][0]
        assert device["reserved_gib"] <= device["capacity_gib"] + 1e-6
    finally:
        httpx.delete(server.url + f"api/kernels/{kernel_id}", headers=server.headers(), timeout=60)
    wait_for(lambda: node.kernel(kernel_id) is None, 30, "the shut-down kernel to leave the books")

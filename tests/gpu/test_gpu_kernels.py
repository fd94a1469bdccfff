"""Idle notebook kernels as GPU tenants on a real GPU: a real IPython kernel under a real Jupyter
server holds a few GiB of torch tensors and a captured CUDA graph. Swapped out, its memory really
leaves the GPU (NVML) while the kernel keeps answering; the next cell restores it first (one status
line with the restore time), and the tensors and the graph's replay are bit-identical. Then the
same kernel and a model that cannot share the GPU with it evict each other by the same policy.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..server import ServerHandle, run_server
from ..test_kernels import V1, KernelSocket, tenant, texts, wait_for
from .test_gpu_swap import server_env

pytestmark = pytest.mark.gpu
GIB = 1024**3
ALLOC_GIB = float(os.environ.get("SWAPSERVE_KERNEL_TEST_GIB", "6"))
#: idle seconds before a kernel is swapped out; the model request of the second test comes sooner
IDLE_TIMEOUT = 15

SETUP = f"""
import torch
n = int({ALLOC_GIB} * 2**30 / 4 / 2)
x = torch.randn(n, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
y = torch.randn(n, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
static_in = torch.randn(2048, 2048, device="cuda", generator=torch.Generator("cuda").manual_seed(3))
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    static_out = torch.tanh(static_in @ static_in)
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    static_out = torch.tanh(static_in @ static_in)
graph.replay()
torch.cuda.synchronize()
def fingerprint():
    graph.replay()
    torch.cuda.synchronize()
    return (x.double().sum().item(), y.double().sum().item(), static_out.double().sum().item(), x[:5].tolist())
reference = fingerprint()
print("ready", torch.cuda.memory_allocated() / 2**30)
"""
CHECK = "print('identical' if fingerprint() == reference else ('DIFFERENT', fingerprint(), reference))"


def kernel_gpu_gib(pid: int) -> float:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    return sum((p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
               if p.pid == pid) / GIB


def api(server: ServerHandle, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.url + path, headers=server.headers(), timeout=600, **kwargs)


def run_cells(server: ServerHandle, kernel_id: str, cells: list[str]) -> list[list[str]]:
    async def go() -> list[list[str]]:
        sock = await KernelSocket.open(server, kernel_id, V1)
        try:
            out = []
            for code in cells:
                msg_id = await sock.send_execute(code)
                got = (await sock.outputs_until_idle([msg_id]))[msg_id]
                out.append(texts(got) + [f"{m['content'].get('ename')}: {m['content'].get('evalue')}"
                                         for m in got if m["msg_type"] == "error"])
            return out
        finally:
            sock.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def kernel_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    # a model that cannot share the GPU with the kernel: its engine takes 93 % of the device
    util = os.environ.get("SWAPSERVE_KERNEL_TEST_UTIL", "0.93")
    models = {"models": [{"name": "gpu-m", "engine": "reference", "model": "shape:llama-3.2-1b", "api": "completion",
                          "args": ["--gpu-memory-utilization", util, "--max-model-len", "1024", "--seed", "0"]}]}
    path = Path(tmp_path_factory.mktemp("gpu-kernels")) / "models.json"
    path.write_text(json.dumps(models))
    args = ["--SwapServe.kernel_check_interval=0.5", f"--SwapServe.kernel_idle_timeout={IDLE_TIMEOUT}"]
    with run_server(path, env=server_env(), extra_args=args) as server:
        try:
            server.wait_models(timeout=600)
            yield server
        finally:
            print("\nSERVER LOG TAIL\n" + server.log()[-4000:])


@pytest.fixture(scope="module")
def gpu_kernel(kernel_server: ServerHandle) -> Iterator[tuple[str, int]]:
    kernel_id = api(kernel_server, "POST", "api/kernels", json={"name": "python3"}).json()["id"]
    try:
        (ready,) = run_cells(kernel_server, kernel_id, [SETUP])
        assert ready and ready[0].startswith("ready"), ready
        state = wait_for(lambda: (t := tenant(kernel_server, kernel_id)).get("state") == "resident" and t,
                         60, "the kernel to become a GPU tenant")
        assert state["memory_gib"] >= ALLOC_GIB, state
        yield kernel_id, state["pids"][0]
    finally:
        api(kernel_server, "DELETE", f"api/kernels/{kernel_id}")


def test_an_idle_kernel_leaves_the_gpu_and_its_next_cell_restores_it(kernel_server: ServerHandle,
                                                                     gpu_kernel: tuple[str, int]) -> None:
    kernel_id, pid = gpu_kernel
    held = kernel_gpu_gib(pid)
    assert held >= ALLOC_GIB
    # idle: swapped out by the timeout, with nothing asked
    state = wait_for(lambda: (t := tenant(kernel_server, kernel_id))["state"] == "swapped_out" and t,
                     IDLE_TIMEOUT + 120, "the idle swap-out")
    assert state["last_swap_out_reason"] == f"idle for {IDLE_TIMEOUT} s"
    print(f"\nkernel swap-out of {held:.2f} GiB after {IDLE_TIMEOUT} s idle: {state['last_swap_out_seconds']:.3f} s, "
          f"steps {state['last_steps']}")
    assert [s["step"] for s in state["last_steps"]] == ["lock", "checkpoint"]  # never a freeze
    assert kernel_gpu_gib(pid) < 0.05, "the kernel's GPU memory left the device"
    # not frozen: the kernel still answers Jupyter (kernel_info over the websocket, heartbeats)
    assert api(kernel_server, "GET", f"api/kernels/{kernel_id}").json()["execution_state"] in ("idle", "starting")

    t0 = time.perf_counter()
    (lines,) = run_cells(kernel_server, kernel_id, [CHECK])
    cell = time.perf_counter() - t0
    steps = tenant(kernel_server, kernel_id)["last_steps"]
    print(f"kernel swap-in: {lines[0].strip()}; cell round trip {cell:.3f} s; {steps}")
    assert lines[0].startswith("GPU state restored in ") and lines[1:] == ["identical\n"], lines
    assert kernel_gpu_gib(pid) >= ALLOC_GIB
    assert tenant(kernel_server, kernel_id)["state"] == "resident"


def test_the_kernel_and_a_model_evict_each_other(kernel_server: ServerHandle, gpu_kernel: tuple[str, int]) -> None:
    kernel_id, pid = gpu_kernel
    assert tenant(kernel_server, kernel_id)["state"] == "resident"  # its last cell just ran: not idle yet
    t0 = time.perf_counter()
    r = api(kernel_server, "POST", "swapserve/v1/completions",
            json={"model": "gpu-m", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    print(f"\nmodel request evicting the idle kernel: {time.perf_counter() - t0:.3f} s, "
          f"swap-in header {r.headers.get('x-swapserve-swap-in-seconds')}")
    state = tenant(kernel_server, kernel_id)
    assert state["state"] == "swapped_out" and state["last_swap_out_reason"] == "preempted for gpu-m"
    assert kernel_gpu_gib(pid) < 0.05

    t0 = time.perf_counter()
    (lines,) = run_cells(kernel_server, kernel_id, [CHECK])
    print(f"kernel cell evicting the idle model: {lines[0].strip()}, round trip {time.perf_counter() - t0:.3f} s")
    assert lines[0].startswith("GPU state restored in ") and lines[1:] == ["identical\n"], lines
    assert kernel_server.model("gpu-m")["state"] == "swapped_out"
    device = kernel_server.status()["devices"][0]
    assert device["reserved_gib"] <= device["capacity_gib"] + 1e-6

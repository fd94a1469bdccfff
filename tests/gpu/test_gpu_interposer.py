"""The allocation interposer on a real GPU: a torch program (cudaMalloc through the caching
allocator, cuBLAS, a captured CUDA graph) under LD_PRELOAD, slept and woken through the control
socket: NVML sees the memory go and come back, the books match torch's own, the tensors and the
graph's replay are bit-identical, the addresses unchanged.

Both ways to the driver are checked: cudaMalloc backed at the runtime's entry point (default), and
with SWAPSERVE_INTERPOSER_RUNTIME_HOOKS=0, through the runtime's own cuGetProcAddress lookups (this
is where one learns whether NVIDIA's runtime allocates through the public cuMemAlloc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jupyter_swapserve.gpu.interposer import SOCKET_ENV, InterposerClient, library_path, prepare_socket_dir

pytestmark = pytest.mark.gpu
GIB = 1 << 30

CHILD = r"""
import json, sys, torch
torch.manual_seed(0)
dev = torch.device("cuda")
a = torch.randn(8192, 8192, device=dev)          # 256 MiB
w = torch.randn(8192, 8192, device=dev)
big = torch.randint(0, 255, (2 * 1024**3,), dtype=torch.uint8, device=dev)  # 2 GiB
out = torch.empty_like(a)
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(3):
        torch.matmul(a, w, out=out)
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    torch.matmul(a, w, out=out)
torch.cuda.synchronize()

def report():
    g.replay()
    torch.cuda.synchronize()
    return {"ptrs": [a.data_ptr(), w.data_ptr(), big.data_ptr(), out.data_ptr()],
            "a": float(a.double().sum()), "big": int(big.sum(dtype=torch.int64)),
            "replay": float(out.double().sum()),
            "reserved": torch.cuda.memory_stats()["reserved_bytes.all.current"]}

print(json.dumps(report()), flush=True)
for line in sys.stdin:
    print(json.dumps(report()), flush=True)
"""


def nvml_gib(pid: int) -> float:
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    return sum((p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid == pid) / GIB


@pytest.fixture(params=["runtime-hooks", "driver-only"])
def child(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, str]]:
    try:
        library = library_path()
    except Exception as exc:
        pytest.skip(str(exc))
    sock = prepare_socket_dir(tmp_path / "control")
    env = {**os.environ, "LD_PRELOAD": str(library), SOCKET_ENV: str(sock)}
    if request.param == "driver-only":
        env["SWAPSERVE_INTERPOSER_RUNTIME_HOOKS"] = "0"
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    yield proc, sock, request.param
    proc.kill()
    _, err = proc.communicate()
    print(err[-3000:])  # the library's own lines, for the log


def ask(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdin and proc.stdout
    proc.stdin.write("report\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


async def test_sleep_frees_the_gpu_and_wake_brings_back_every_byte(child: tuple[subprocess.Popen[str], Path, str]) \
        -> None:
    proc, sock, path = child
    assert proc.stdout
    first = json.loads(proc.stdout.readline())
    client = InterposerClient(sock)
    st = await client.status()
    print(path, json.dumps({k: st.raw[k] for k in ("captured", "resident", "problems", "hooks", "staging")}))
    assert st.capture_problem() is None
    # the books: every segment of torch's allocator is captured or (below the threshold) resident
    assert st.captured_bytes + st.raw["resident"]["small"]["bytes"] >= first["reserved"] >= 2 * GIB
    if path == "runtime-hooks":
        assert st.hooks["runtime"] > 0
    else:
        assert st.hooks["runtime"] == 0 and st.hooks["proc_address"] > 0
    await client.prepare()
    used = nvml_gib(proc.pid)
    for cycle in range(2):
        slept = await client.sleep()
        asleep = nvml_gib(proc.pid)
        print(f"cycle {cycle}: sleep {slept.seconds:.3f} s {[(s.step, round(s.seconds, 3)) for s in slept.steps]}, "
              f"NVML {used:.2f} → {asleep:.2f} GiB")
        assert used - asleep >= 0.95 * slept.bytes / GIB
        woke = await client.wake()
        print(f"cycle {cycle}: wake {woke.seconds:.3f} s {[(s.step, round(s.seconds, 3)) for s in woke.steps]}, "
              f"{woke.bytes / GIB / woke.seconds:.1f} GiB/s")
        assert ask(proc) == first  # the same bytes at the same addresses; the graph replays the same

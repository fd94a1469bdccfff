"""The real thing on a real GPU: a Jupyter server with two reference engines that do not fit on
the device together (the devices section is omitted, so the GPUs come from NVML). Requests
alternate, so swaps happen through the engine-aware path (sleep → checkpoint of the residual →
freeze; thaw → restore → unlock → wake); answers stream and are the same after every swap;
the memory really leaves the GPU (NVML); a request that arrives during a swap waits and succeeds.

Swap integrity, the gate for what the CPU cannot show (docs/testing.md): every engine records its
``GET /integrity`` (a bit-exact digest of its weights on the device, a fixed prompt's logits) just
before its first sleep, the startup snapshot, before any swap could touch it; after every swap-in
the weights must be bit-identical to it and the logits within ``integrity.GPU_LOGITS_RTOL``. The
weights here are seeded (``shape:``: nothing to download), so a wake that regenerated them from
the seed would still match: tests/test_contention_overlap.py, with weights from a checkpoint, is
the gate for that one.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .. import integrity
from ..server import ServerHandle, free_port, run_server

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
PROMPT = "Swapping engines in and out of GPU memory"


def device_used_gib() -> float:
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / GIB


def device_total_gib() -> float:
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total / GIB


def assert_intact(port: int) -> None:
    """The running engine on ``port`` has the weights (bit for bit) and the logits of before its first sleep."""
    report = integrity.report(f"http://127.0.0.1:{port}")
    assert report["before_first_sleep"] is not None, "the engine slept (its startup snapshot) without a baseline"
    assert integrity.differences(report["now"], report["before_first_sleep"], exact_logits=False) == []
    exact = report["now"]["logits_digest"] == report["before_first_sleep"]["logits_digest"]
    print(f"\nintegrity on :{port}: weights bit-identical, logits {'bit-identical' if exact else 'within tolerance'}")


def server_env() -> dict[str, str]:
    # the package need not be installed: the server and its engines import it from the checkout
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
            "JUPYTER_CONFIG_PATH": str(ROOT / "jupyter-config")}


#: each engine's port: the test reads its GET /integrity there (the service does not relay it)
PORTS = {name: free_port() for name in ("gpu-a", "gpu-b")}


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    util = os.environ.get("SWAPSERVE_TEST_UTIL", "0.55")  # two of them exceed one GPU
    models = {"models": [
        {"name": name, "engine": "reference", "model": "shape:llama-3.2-1b", "api": "completion",
         "residual": "checkpoint",  # this file tests the checkpoint path; residual: auto is test_gpu_contention's
         "port": PORTS[name],
         "args": ["--gpu-memory-utilization", util, "--max-model-len", "1024", "--cuda-graphs", "--seed", str(i),
                  "--record-integrity"]}
        for i, name in enumerate(("gpu-a", "gpu-b"))]}
    path = tmp_path_factory.mktemp("gpu") / "models.json"
    path.write_text(json.dumps(models))
    with run_server(path, env=server_env()) as server:
        try:
            server.wait_models(timeout=600)
            yield server
        finally:
            print("\nSERVER LOG TAIL\n" + server.log()[-3000:])


def stream(server: ServerHandle, model: str) -> tuple[str, int, float, float]:
    """(text, chunks, swap-in seconds from the header, seconds to the first chunk)."""
    t0 = time.perf_counter()
    first = None
    text, chunks = "", 0
    with httpx.stream("POST", server.api + "/completions", headers=server.headers(), timeout=600,
                      json={"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                            "stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        swap_in = float(r.headers["x-swapserve-swap-in-seconds"])
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0].get("text") or ""
            if piece:
                first = first or time.perf_counter() - t0
                chunks += 1
                text += piece
    return text, chunks, swap_in, first or 0.0


def test_startup_measures_and_swaps_out_both(gpu_server: ServerHandle) -> None:
    status = gpu_server.status()
    assert status["checkpointer"] == "cuda-driver"
    assert status["devices"][0]["kind"] == "nvidia"
    capacity = status["devices"][0]["capacity_gib"]
    for m in status["models"]:
        assert m["state"] == "swapped_out"
        assert m["memory_measured"] and m["memory_gib"] > capacity / 2, "the two do not fit together"
        steps = [s["step"] for s in m["last_steps"]]
        assert steps[:1] == ["sleep"] and "checkpoint" in steps and steps[-1] == "freeze", steps
    assert device_used_gib() < 8, "both swapped out: their memory left the GPU"


def test_alternating_requests_swap_and_answer_the_same(gpu_server: ServerHandle) -> None:
    texts: dict[str, str] = {}
    for model in ("gpu-a", "gpu-b", "gpu-a", "gpu-b"):
        text, chunks, swap_in, ttft = stream(gpu_server, model)
        print(f"\n{model}: swap-in {swap_in:.3f} s, first chunk {ttft:.3f} s, {chunks} chunks")
        assert chunks >= 2, "the answer streams"
        assert swap_in > 0, "a swap happened"
        assert_intact(PORTS[model])  # against the report of before its first sleep
        assert texts.setdefault(model, text) == text, "the same answer after every swap"
        # the victim's residual checkpoint overlaps with this answer (overlapped eviction): let it finish
        deadline = time.monotonic() + 60
        while True:
            models = {m["name"]: m for m in gpu_server.status()["models"]}
            other = models["gpu-b" if model == "gpu-a" else "gpu-a"]
            if other["state"] != "swapping_out" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert models[model]["state"] == "running" and other["state"] == "swapped_out"
        # only the running engine holds memory: the other one's really left the device
        assert device_used_gib() < models[model]["memory_gib"] + 4
        assert [s["step"] for s in models[model]["last_steps"]] == ["thaw", "restore", "unlock", "wake"]
    assert texts["gpu-a"] != texts["gpu-b"], "two different models answered"


def test_request_during_a_swap_waits_and_succeeds(gpu_server: ServerHandle) -> None:
    current = {m["name"]: m["state"] for m in gpu_server.status()["models"]}
    target = "gpu-a" if current["gpu-a"] == "swapped_out" else "gpu-b"
    results: dict[str, tuple[str, int, float, float]] = {}

    def first() -> None:
        results["first"] = stream(gpu_server, target)

    t = threading.Thread(target=first)
    t.start()
    deadline = time.monotonic() + 60
    seen = None
    while time.monotonic() < deadline:  # fire the second request while the swap is under way
        seen = {m["name"]: m["state"] for m in gpu_server.status()["models"]}
        if seen[target] in ("swapping_in", "running") or any(s == "swapping_out" for s in seen.values()):
            break
        time.sleep(0.005)
    results["second"] = stream(gpu_server, target)
    t.join(120)
    print(f"\nsecond request fired while states were {seen}")
    assert results["first"][0] == results["second"][0]
    assert results["first"][2] > 0 and results["second"][1] >= 2
    m = next(m for m in gpu_server.status()["models"] if m["name"] == target)
    assert m["state"] == "running" and m["error"] is None
    assert_intact(PORTS[target])


def test_manual_swap_out_frees_the_device(gpu_server: ServerHandle) -> None:
    for name in ("gpu-a", "gpu-b"):
        r = httpx.post(gpu_server.url + f"swapserve/api/models/{name}/swap-out", headers=gpu_server.headers(),
                       timeout=300)
        assert r.status_code == 200, r.text
    assert all(m["state"] == "swapped_out" for m in gpu_server.status()["models"])
    used = device_used_gib()
    print(f"\nboth swapped out: {used:.2f} of {device_total_gib():.1f} GiB in use")
    assert used < 8

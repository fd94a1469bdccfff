"""The users' engines for real on a GPU, under the service: vLLM (sleep mode, levels 1 and 2) and
llama.cpp's llama-server (no sleep hook: checkpoint and freeze). Each starts, answers, is swapped
out (its memory leaves the GPU), swapped back in by a request, and answers the same (greedy).

Each engine is skipped where it is not there: the 8B models from bench/gpu/make_models.py under
SWAPSERVE_GPU_MODELS (default /tmp/gpu25/models), vLLM installed at SWAPSERVE_VLLM_SITE (default
/tmp/site-vllm, as bench/gpu/device.sh installs it), llama-server at SWAPSERVE_LLAMA_SERVER
(default /tmp/gpu25/llama-build/bin/llama-server). bench/gpu/PLAN.md says how they get there.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..server import ServerHandle, run_server
from .test_gpu_swap import device_used_gib, server_env, stream

pytestmark = pytest.mark.gpu
MODELS = Path(os.environ.get("SWAPSERVE_GPU_MODELS", "/tmp/gpu25/models"))
VLLM_SITE = Path(os.environ.get("SWAPSERVE_VLLM_SITE", "/tmp/site-vllm"))
LLAMA_SERVER = Path(os.environ.get("SWAPSERVE_LLAMA_SERVER", "/tmp/gpu25/llama-build/bin/llama-server"))


def engine_models(engine: str) -> list[dict]:
    if engine == "vllm":
        if not (VLLM_SITE / "vllm").is_dir() or not (MODELS / "hf" / "config.json").exists():
            pytest.skip(f"vLLM at {VLLM_SITE} or the HF model under {MODELS} is missing")
        # as bench/engines_gpu.py starts it on the H200: the interpreter and vLLM's module (the staged
        # install's console script is not relied on: on 2026-12-02 a later `pip --target` deleted it), and
        # PyTorch's sampling (FlashInfer is not staged; without this vLLM 0.26's engine core dies at start)
        env = {"PYTHONPATH": str(VLLM_SITE), "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
               "VLLM_USE_FLASHINFER_SAMPLER": "0"}
        command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
        args = ["--max-model-len", "1024", "--dtype", "bfloat16", "--gpu-memory-utilization", "0.3"]
        return [{"name": f"vllm-l{level}", "engine": "vllm", "command": command, "model": str(MODELS / "hf"),
                 "api": "completion", "env": env, "args": args, "sleep_level": level, "residual": "checkpoint",
                 "start_timeout": 900}
                for level in (1, 2)]
    if not LLAMA_SERVER.exists() or not (MODELS / "model-f16.gguf").exists():
        pytest.skip(f"llama-server at {LLAMA_SERVER} or the GGUF under {MODELS} is missing")
    return [{"name": "llama", "engine": "llama-server", "command": str(LLAMA_SERVER),
             "model": str(MODELS / "model-f16.gguf"), "api": "completion",
             "args": ["-ngl", "999", "-c", "4096", "--seed", "0"], "residual": "checkpoint", "start_timeout": 600}]


@pytest.fixture(scope="module", params=["vllm", "llama-server"])
def engine_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    path = tmp_path_factory.mktemp(request.param) / "models.json"
    path.write_text(json.dumps({"models": engine_models(request.param)}))
    with run_server(path, env=server_env()) as server:
        try:
            server.wait_models(timeout=1200)
            yield server
        finally:
            print("\nSERVER LOG TAIL\n" + server.log()[-3000:])


def swap_out(server: ServerHandle, name: str) -> None:
    r = httpx.post(server.url + f"swapserve/api/models/{name}/swap-out", headers=server.headers(), timeout=600)
    assert r.status_code == 200, r.text


def test_answers_the_same_after_each_swap(engine_server: ServerHandle) -> None:
    for m in engine_server.status()["models"]:
        name = m["name"]
        for other in engine_server.status()["models"]:  # alone on the GPU: its own memory is what is measured
            if other["state"] == "running":
                swap_out(engine_server, other["name"])
        assert engine_server.model(name)["error"] is None, m
        first, chunks, swap_in, _ = stream(engine_server, name)
        assert chunks >= 2 and swap_in > 0, "the first request swapped the engine in and it streams"
        for cycle in range(2):
            swap_out(engine_server, name)
            status = engine_server.model(name)
            assert status["state"] == "swapped_out"
            assert device_used_gib() < 4, "its memory left the GPU"
            text, _, swap_in, ttft = stream(engine_server, name)
            print(f"\n{name} cycle {cycle}: swap-in {swap_in:.3f} s, first token {ttft:.3f} s, "
                  f"steps {[s['step'] for s in engine_server.model(name)['last_steps']]}")
            assert swap_in > 0
            assert text == first, "greedy answers are the same after the swap"

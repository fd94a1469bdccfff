"""Contention on a real GPU: three unmeasured 8B-shape reference engines with `residual: auto`,
of which two fit. Every one starts (a start takes the room it needs by checkpointing kept
residuals, never failing because of them), and round-robin requests, each needing an eviction,
stream the same answers after every swap, and after every swap-in the engine's weights are bit-identical to,
and its fixed prompt's logits within tolerance of, its own report from just before its first sleep
(tests/gpu/test_gpu_swap.py says what that proves and what it cannot)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import httpx
import pytest

from ..server import ServerHandle, free_port, run_server
from .test_gpu_swap import assert_intact, server_env

pytestmark = pytest.mark.gpu
NAMES = ("c0", "c1", "c2")
PORTS = {name: free_port() for name in NAMES}


@pytest.fixture(scope="module")
def three_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    util = os.environ.get("SWAPSERVE_TEST_CONTENTION_UTIL", "0.38")  # two fit, three do not
    models = {"models": [
        {"name": name, "engine": "reference", "model": "shape:llama-3.1-8b", "api": "completion",
         "residual": "auto", "port": PORTS[name],
         "args": ["--gpu-memory-utilization", util, "--max-model-len", "1024", "--seed", str(i), "--record-integrity"]}
        for i, name in enumerate(NAMES)]}
    path = tmp_path_factory.mktemp("contention") / "models.json"
    path.write_text(json.dumps(models))
    with run_server(path, env=server_env()) as server:
        try:
            server.wait_models(timeout=600)
            yield server
        finally:
            print("\nSERVER LOG TAIL\n" + server.log()[-3000:])


def answer(server: ServerHandle, model: str) -> tuple[str, float]:
    text = ""
    with httpx.stream("POST", server.api + "/completions", headers=server.headers(), timeout=600,
                      json={"model": model, "prompt": "Swapping under contention", "max_tokens": 10,
                            "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        swap_in = float(r.headers["x-swapserve-swap-in-seconds"])
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += json.loads(line[6:])["choices"][0].get("text") or ""
    return text, swap_in


def test_three_unmeasured_engines_start_with_residual_auto(three_engines: ServerHandle) -> None:
    status = three_engines.status()
    assert [m["state"] for m in status["models"]] == ["swapped_out"] * 3, status["models"]
    assert all(m["memory_measured"] and m["memory_gib"] > 20 for m in status["models"])
    capacity = status["devices"][0]["capacity_gib"]
    assert sum(m["memory_gib"] for m in status["models"]) > capacity  # they really do not all fit


def test_contended_swaps_keep_answers_identical(three_engines: ServerHandle) -> None:
    first = {}
    for name in NAMES:
        first[name] = answer(three_engines, name)[0]
        assert_intact(PORTS[name])
    assert all(first.values())
    swapped = 0
    for _ in range(2):
        for name in NAMES:
            text, swap_in = answer(three_engines, name)
            assert_intact(PORTS[name])  # the baseline: its report of before its first sleep
            assert text == first[name], (name, text, first[name])
            swapped += swap_in > 0
            device = three_engines.status()["devices"][0]
            assert device["reserved_gib"] <= device["capacity_gib"] + 1e-6
    assert swapped >= 3  # round robin over three with room for two: swaps with evictions happened
    log = three_engines.log()
    assert "preempted for" in log

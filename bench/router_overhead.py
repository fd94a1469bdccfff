"""Latency the route adds over calling the same engine directly: same machine, same run.

Starts a real Jupyter server with the demo models, swaps one model in, then sends interleaved
pairs of identical requests (one-token completions) through /swapserve/v1 and straight to the
engine's port, and prints p50/p99 of each and of the per-pair difference.

    python bench/router_overhead.py [--requests 300] [--model gemma]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.server import run_server


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--model", default="gemma")
    args = parser.parse_args()

    with run_server() as server:
        server.wait_models()
        headers = server.headers()
        with httpx.Client(timeout=60) as h:
            r = h.post(f"{server.url}swapserve/api/models/{args.model}/swap-in", headers=headers)
            r.raise_for_status()
            port = None
            model = server.model(args.model)
            # the engine's own address, as the service forwards to it
            for pid in model["pids"]:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"--port" in cmdline:
                    port = int(cmdline[cmdline.index(b"--port") + 1])
            assert port, "engine port not found"
            body = {"model": args.model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
            routed_url, direct_url = server.api + "/completions", f"http://127.0.0.1:{port}/v1/completions"
            for _ in range(10):  # warm both paths (connections, caches)
                h.post(routed_url, json=body, headers=headers).raise_for_status()
                h.post(direct_url, json=body).raise_for_status()
            routed, direct, added = [], [], []
            for i in range(args.requests):
                order = [("r", routed_url), ("d", direct_url)] if i % 2 else [("d", direct_url), ("r", routed_url)]
                pair = {}
                for kind, url in order:
                    t0 = time.perf_counter()
                    resp = h.post(url, json=body, headers=headers if kind == "r" else None)
                    pair[kind] = time.perf_counter() - t0
                    resp.raise_for_status()
                routed.append(pair["r"])
                direct.append(pair["d"])
                added.append(pair["r"] - pair["d"])
    ms = 1000.0
    print(f"\nRouter overhead, {args.requests} interleaved pairs, model {args.model} (llama.cpp, 1-token completion)")
    print(f"{'path':<22}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, values in (("direct to engine", direct), ("through the route", routed), ("added (per pair)", added)):
        print(f"{name:<22}{percentile(values, 50) * ms:>10.2f}{percentile(values, 99) * ms:>10.2f}"
              f"{statistics.mean(values) * ms:>10.2f}")
    print(f"\nratio routed/direct at p50: {percentile(routed, 50) / percentile(direct, 50):.3f}")
    print("goal: added p50 <= 1 ms, p99 <= 5 ms")


if __name__ == "__main__":
    main()

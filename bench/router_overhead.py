"""Latency the route adds over calling the same engine directly: same machine, same run.

Starts a real Jupyter server with the demo models, swaps one model in, then sends interleaved
triples of identical requests (one-token completions): straight to the engine's own Unix socket,
through the engine's gate (the port the service calls, runtime/gate.py), and through
/swapserve/v1; prints p50/p99 of each and of the per-triple differences.

    python bench/router_overhead.py [--requests 300] [--model gemma]
"""

from __future__ import annotations

import argparse
import os
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
            model = server.model(args.model)
            # the engine's socket (its processes' open listening socket) and its gate port (the name)
            inodes = {int(os.readlink(fd)[8:-1]) for pid in model["pids"] for fd in Path(f"/proc/{pid}/fd").iterdir()
                      if os.readlink(fd).startswith("socket:[")}
            listening = {int(f[6]): f[7] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
                         if len(f := line.split()) >= 8 and f[5] == "01"}
            sockets = [listening[i] for i in inodes if i in listening]
            assert len(sockets) == 1, f"the engine's socket: {sockets}"
            port = int(Path(sockets[0]).stem)
            body = {"model": args.model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
            urls = {"r": server.api + "/completions", "g": f"http://127.0.0.1:{port}/v1/completions",
                    "d": "http://engine/v1/completions"}
            clients = {"r": h, "g": h, "d": httpx.Client(timeout=60, transport=httpx.HTTPTransport(uds=sockets[0]))}
            for _ in range(10):  # warm every path (connections, caches)
                for kind, url in urls.items():
                    clients[kind].post(url, json=body, headers=headers if kind == "r" else None).raise_for_status()
            times: dict[str, list[float]] = {"d": [], "g": [], "r": []}
            for i in range(args.requests):
                order = list(urls)[i % 3:] + list(urls)[:i % 3]
                for kind in order:
                    t0 = time.perf_counter()
                    resp = clients[kind].post(urls[kind], json=body, headers=headers if kind == "r" else None)
                    times[kind].append(time.perf_counter() - t0)
                    resp.raise_for_status()
    ms = 1000.0
    gate_added = [g - d for g, d in zip(times["g"], times["d"], strict=True)]
    route_added = [r - d for r, d in zip(times["r"], times["d"], strict=True)]
    print(f"\nRouter overhead, {args.requests} interleaved triples, model {args.model} (llama.cpp, 1-token completion)")
    print(f"{'path':<28}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, values in (("engine's socket (direct)", times["d"]), ("the engine's gate", times["g"]),
                         ("through the route", times["r"]), ("gate added (per triple)", gate_added),
                         ("route added (per triple)", route_added)):
        print(f"{name:<28}{percentile(values, 50) * ms:>10.2f}{percentile(values, 99) * ms:>10.2f}"
              f"{statistics.mean(values) * ms:>10.2f}")
    print(f"\nratio routed/direct at p50: {percentile(times['r'], 50) / percentile(times['d'], 50):.3f}")
    print("goal: added p50 <= 1 ms, p99 <= 5 ms")

if __name__ == "__main__":
    main()

"""Is PCIe full duplex between two processes? One process copies its weights out (D2H) while
another copies its weights in (H2D), as an overlapped eviction does; each alone, then both at once.

Two child processes, each with its own CUDA context (as two engines have), pinned host buffers,
``--gib`` each way. Prints one table and one JSON line.

Usage (on the GPU machine):  python bench/pcie_duplex.py --gib 15
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from typing import Any

GIB = 1024**3


def copier(direction: str, gib: float, start: Any, ready: Any, out: Any) -> None:
    import torch

    n = int(gib * GIB) // 2
    dev = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    host = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
    src, dst = (dev, host) if direction == "d2h" else (host, dev)
    for _ in range(2):  # warm: the first copy maps the pages
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
    ready.set()
    start.wait()
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    out.put((direction, t0, t1))


def run(directions: list[str], gib: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs, readies = [], []
    for d in directions:
        ready = ctx.Event()
        p = ctx.Process(target=copier, args=(d, gib, start, ready, out))
        p.start()
        procs.append(p)
        readies.append(ready)
    for r in readies:
        r.wait(120)
    start.set()
    results = [out.get(timeout=120) for _ in directions]
    for p in procs:
        p.join(60)
    t0 = min(r[1] for r in results)
    t1 = max(r[2] for r in results)
    per = {d: {"seconds": round(b - a, 4), "gb_s": round(gib * GIB / 1e9 / (b - a), 1)} for d, a, b in results}
    return {"directions": directions, "wall_s": round(t1 - t0, 4), "per_direction": per}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=15.0)
    args = p.parse_args()
    rows = [run(["d2h"], args.gib), run(["h2d"], args.gib), run(["d2h", "h2d"], args.gib)]
    print(f"| copies ({args.gib:g} GiB each, separate processes) | wall | per direction |")
    print("|---|---|---|")
    for r in rows:
        per = ", ".join(f"{d} {v['seconds']:.3f} s ({v['gb_s']} GB/s)" for d, v in r["per_direction"].items())
        print(f"| {' + '.join(r['directions'])} | {r['wall_s']:.3f} s | {per} |")
    print(json.dumps({"gib": args.gib, "runs": rows}))


if __name__ == "__main__":
    main()

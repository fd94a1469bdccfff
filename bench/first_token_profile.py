"""Where a swapped-in reference engine's first token goes: the engine in-process (no server), a
sleep and a wake, then the parts of the first request timed one by one, against the same request
on a warm engine. With ``--profile``, the top operators of the first prefill after a wake.

Usage (on the GPU machine):  python bench/first_token_profile.py --compile --cuda-graphs
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import threading
import time

import torch

from jupyter_swapserve.reference.engine import Engine
from jupyter_swapserve.reference.model import layer_forward
from jupyter_swapserve.reference.server import parse_args


def timed(eng: Engine, ids: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        x = torch.tensor(ids, dtype=torch.long, device=eng.device)
        torch.cuda.synchronize()
        out["ids_to_device_s"] = time.perf_counter() - t0
        t = time.perf_counter()
        logits = eng._prefill(x)
        out["prefill_launch_s"] = time.perf_counter() - t
        torch.cuda.synchronize()
        out["prefill_s"] = time.perf_counter() - t
        t = time.perf_counter()
        int(torch.argmax(logits[0]).item())
        out["argmax_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tokens = list(eng.generate(ids, 1, 0.0, None))
    out["generate_1_s"] = time.perf_counter() - t
    out["total_s"] = time.perf_counter() - t0
    assert tokens
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", action="store_true")
    known, rest = p.parse_known_args()
    args = parse_args(["--model", "shape:llama-3.1-8b", "--gpu-memory-utilization", "0.38",
                       "--max-model-len", "2048", "--staging", "hugepages", *rest])
    eng = Engine(args)
    ids = eng.tokenizer.encode("Hello")
    rows = {"warm_1": timed(eng, ids), "warm_2": timed(eng, ids)}
    for cycle in range(3):
        eng.sleep(1)
        time.sleep(0.5)
        eng.wake()
        rows[f"after_wake_{cycle}"] = timed(eng, ids)
    rows["warm_after"] = timed(eng, ids)
    # an HTTP server that starts a thread per request runs each first token on a new thread
    pool = cf.ThreadPoolExecutor(1)
    for i in range(3):
        result: dict[str, dict[str, float]] = {}
        thread = threading.Thread(target=lambda r=result: r.update(row=timed(eng, ids)))
        thread.start()
        thread.join()
        rows[f"new_thread_{i}"] = result["row"]
        rows[f"same_worker_thread_{i}"] = pool.submit(timed, eng, ids).result()
    eng.sleep(1)
    eng.wake()
    rows["after_wake_same_worker_thread"] = pool.submit(timed, eng, ids).result()
    compiled = eng.prefill_layer
    eng.prefill_layer = layer_forward
    rows["warm_eager_prefill"] = timed(eng, ids)
    eng.sleep(1)
    eng.wake()
    rows["after_wake_eager_prefill"] = timed(eng, ids)
    eng.prefill_layer = compiled
    for name, row in rows.items():
        print(name, json.dumps(row), flush=True)
    print("timings", json.dumps(eng.timings), "wake", json.dumps(eng.last_wake))
    if known.profile:
        eng.sleep(1)
        eng.wake()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            timed(eng, ids)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()

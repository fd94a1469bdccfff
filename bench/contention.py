"""Swapping under contention on a real GPU: three 8B-shape reference engines that do not all fit,
through the real Jupyter route.

For each `residual` option given (checkpoint, keep, auto) it starts a server with three engines
(`--gpu-memory-utilization` so that two fit) and measures:

- (a) round robin, one client, streaming: time to first token, split by whether the request found
  free memory or needed an eviction (decided from /swapserve/api/status just before it);
- (b) a burst: `--burst` concurrent clients over the three models: swaps per served request,
  goodput (served requests per second), time to first token p50/p95;
- (c) the always-on baseline: the same burst with three smaller engines that all fit (no swaps);
- (d) free memory (after the burst): each model requested after the others were swapped out (as
  by an idle timeout), counted with (a)'s free-memory requests.

Usage (on the GPU machine; see bench/gpu_run.sh):
    python bench/contention.py --residual auto,checkpoint --out results_dir
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.swap_latency import first_token  # noqa: E402
from tests.server import ServerHandle, run_server  # noqa: E402

SHAPE = "shape:llama-3.1-8b"
NAMES = ("m0", "m1", "m2")


def models_file(residual: str, util: float, memory_gib: float | None, shape: str = SHAPE,
                pinned: bool = False, graphs: bool = False, copy_out: str = "changed") -> dict[str, Any]:
    models = []
    # --graphs: the decode step compiled and captured as a CUDA graph, as a production engine runs it
    fast = ["--compile", "--cuda-graphs"] if graphs else []
    fast += ["--copy-out", copy_out]
    for i, name in enumerate(NAMES):
        m: dict[str, Any] = {"name": name, "engine": "reference", "model": shape, "api": "completion",
                             "args": ["--gpu-memory-utilization", str(util), "--max-model-len", "2048",
                                      "--seed", str(i), "--staging", "hugepages", *fast],
                             "residual": residual, "concurrency": 8, "start_timeout": 900, "pinned": pinned}
        if memory_gib is not None:
            m["memory_gib"] = memory_gib
        models.append(m)
    return {"models": models}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def model_in(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in status["models"] if m["name"] == name)


def needs_eviction(status: dict[str, Any], name: str) -> bool:
    model = model_in(status, name)
    if model["state"] == "running":
        return False
    device = status["devices"][model["device"]]
    need = (model["memory_gib"] or 0) - (model["residual_gib"] or 0)
    return device["free_gib"] + 1e-6 < need


def round_robin(server: ServerHandle, rounds: int) -> list[dict[str, Any]]:
    out = []
    for i in range(rounds * len(NAMES)):
        name = NAMES[i % len(NAMES)]
        status = server.status()
        evict = needs_eviction(status, name)
        state = model_in(status, name)["state"]
        r = first_token(server, name)
        r.update({"model": name, "was": state, "eviction": evict})
        print("rr", json.dumps(r), flush=True)
        out.append(r)
    return out


def free_memory(server: ServerHandle, settle_s: float = 15.0) -> list[dict[str, Any]]:
    """(d) each model requested when the GPU has room for it: every other model is swapped out
    first (as an idle timeout would), and the idle sweep is given time to bring checkpointed
    residuals back (what `residual: auto` does on a node that is not full)."""
    out = []
    for name in NAMES:
        for m in server.status()["models"]:
            if m["state"] == "running":
                httpx.post(server.url + f"swapserve/api/models/{m['name']}/swap-out", headers=server.headers(),
                           timeout=120).raise_for_status()
        deadline = time.monotonic() + settle_s
        while True:
            status = server.status()
            model = model_in(status, name)
            if model["residual_gib"] or model["residual"] != "auto" or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        r = first_token(server, name)
        r.update({"model": name, "was": model["state"], "eviction": needs_eviction(status, name),
                  "phase": "free", "residual_on_gpu": bool(model["residual_gib"])})
        print("free", json.dumps(r), flush=True)
        out.append(r)
    return out


def burst(server: ServerHandle, clients: int, tokens: int = 16) -> dict[str, Any]:
    before = {m["name"]: m["swaps_in"] for m in server.status()["models"]}
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(first_token, server, NAMES[i % len(NAMES)], tokens) for i in range(clients)]
        results = []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as exc:  # counted as not served
                results.append({"error": repr(exc)})
    wall = time.perf_counter() - t0
    after = {m["name"]: m["swaps_in"] for m in server.status()["models"]}
    served = [r for r in results if "error" not in r]
    swaps = sum(after[n] - before[n] for n in after)
    ttfts = [r["ttft_s"] for r in served if r["ttft_s"] is not None]
    summary = {"clients": clients, "tokens": tokens, "served": len(served), "wall_s": wall,
               "goodput_rps": len(served) / wall,
               "swaps": swaps, "swaps_per_request": swaps / max(1, len(served)),
               "ttft_p50_s": pct(ttfts, 0.5), "ttft_p95_s": pct(ttfts, 0.95),
               "errors": [r["error"] for r in results if "error" in r][:3]}
    print("burst", json.dumps(summary), flush=True)
    return summary


SWAP_LOG = ("swap-in", "swap-out", "handed over", "residual")


def run_variant(label: str, spec: dict[str, Any], rounds: int, clients: int, start_timeout: float,
                tokens: int = 16) -> dict[str, Any]:
    path = Path(tempfile.mkdtemp()) / f"{label}.json"
    path.write_text(json.dumps(spec))
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
           "JUPYTER_CONFIG_PATH": str(ROOT / "jupyter-config")}
    result: dict[str, Any] = {"label": label, "spec": spec}
    t0 = time.perf_counter()
    with run_server(path, env=env) as server:
        try:
            status = server.wait_models(timeout=start_timeout)
        except Exception as exc:
            result["startup_error"] = str(exc)[:2000]
            result["server_log_tail"] = server.log()[-4000:]
            print(f"{label}: startup failed: {str(exc)[:500]}", flush=True)
            return result
        result["startup_wall_s"] = time.perf_counter() - t0
        result["memory_gib"] = {m["name"]: m["memory_gib"] for m in status["models"]}
        result["capacity_gib"] = status["devices"][0]["capacity_gib"]
        print(f"{label}: started in {result['startup_wall_s']:.1f} s, sizes {result['memory_gib']}", flush=True)
        if rounds:
            result["round_robin"] = round_robin(server, rounds)
        if clients:  # from the round robin's end: two engines resident, the third's residual kept
            result["burst"] = burst(server, clients, tokens)
        if rounds:
            result["round_robin"] += free_memory(server)
        log = server.log()
        # every swap's steps and what was handed over during each sleep: where the time went
        result["swap_log"] = [line[-400:] for line in log.splitlines() if any(k in line for k in SWAP_LOG)][-80:]
        result["server_log_tail"] = log[-3000:]
    return result


def summarize(results: list[dict[str, Any]]) -> str:
    lines = ["| variant | TTFT free memory p50 | of which residual on the GPU (d) | TTFT eviction needed p50 | "
             "burst swaps/request | burst goodput (req/s) | burst TTFT p50 / p95 |", "|---|---|---|---|---|---|---|"]
    base = next((r for r in results if r["label"] == "always-on"), None)
    base_rps = base.get("burst", {}).get("goodput_rps") if base else None

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    def p50(values: list[float]) -> str:
        return f(statistics.median(values)) if values else "-"

    for r in results:
        rr = r.get("round_robin", [])
        free = [x["ttft_s"] for x in rr if not x["eviction"] and x["was"] != "running" and x["ttft_s"]]
        evict = [x["ttft_s"] for x in rr if x["eviction"] and x["ttft_s"]]
        kept = [x["ttft_s"] for x in rr if not x["eviction"] and x.get("residual_on_gpu") and x["ttft_s"]]
        b = r.get("burst", {})
        rps = b.get("goodput_rps")
        ratio = f" ({100 * rps / base_rps:.0f} %)" if rps and base_rps and r is not base else ""
        lines.append(f"| {r['label']} | {p50(free)} | {p50(kept)} | {p50(evict)} | {f(b.get('swaps_per_request'))} | "
                     f"{f(rps)}{ratio} | {f(b.get('ttft_p50_s'))} / {f(b.get('ttft_p95_s'))} |")
        if r.get("startup_error"):
            lines.append(f"| {r['label']}: startup failed: {r['startup_error'][:120]} | | | | | | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--residual", default="auto,checkpoint", help="comma-separated: auto, checkpoint, keep")
    p.add_argument("--util", type=float, default=0.38, help="each engine's share of the GPU (two fit, three do not)")
    p.add_argument("--baseline-util", type=float, default=0.25, help="the always-on baseline: three that fit")
    p.add_argument("--baseline-gib", type=float, default=19.5, help="their size (measured 19.02 GiB at 0.25)")
    p.add_argument("--no-variants", action="store_true", help="only the always-on baseline")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--burst", type=int, default=24)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--shape", default=SHAPE, help="shape:tiny for a dry run on a CPU")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--graphs", action="store_true", help="engines with --compile --cuda-graphs")
    p.add_argument("--tokens", type=int, default=16, help="tokens per burst request")
    p.add_argument("--copy-out", default="changed", choices=["changed", "always"],
                   help="the engines' level-1 sleep: skip the copy when the host copy is exact, or always copy")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    results = []
    for residual in [r for r in args.residual.split(",") if r and not args.no_variants]:
        # keep needs sizes up front (an unmeasured start would reserve the device); auto and checkpoint measure
        memory = 31.1 if residual == "keep" else None
        spec = models_file(residual, args.util, memory, args.shape, graphs=args.graphs, copy_out=args.copy_out)
        results.append(run_variant(f"residual: {residual}", spec, args.rounds, args.burst, args.start_timeout,
                                   args.tokens))
    if not args.no_baseline:
        # always on: pinned (never swapped), sized up front (a pinned start cannot take the whole device)
        spec = models_file("auto", args.baseline_util, args.baseline_gib, args.shape, pinned=True, graphs=args.graphs,
                           copy_out=args.copy_out)
        results.append(run_variant("always-on", spec, 0, args.burst, args.start_timeout, args.tokens))
    table = summarize(results)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.date.today().isoformat()
    (out / f"{stamp}-contention.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{stamp}-contention.md").write_text(f"# Contention benchmark ({stamp})\n\n{table}\n")


if __name__ == "__main__":
    main()

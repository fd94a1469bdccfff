"""Swap latency on a real GPU: cold start vs. swap-in → first token, for the engine-aware path
(sleep → checkpoint of the residual → freeze) and the plain-checkpoint path (everything
checkpointed), through the real Jupyter route.

For each size (1B- and 8B-shaped Llama, random bf16 weights) it serves two copies of the
reference engine: ``<size>-aware`` (``engine: reference``, with sleep hooks) and ``<size>-plain``
(``engine: command``, the same server with no hooks, so the whole state is checkpointed). It
measures:

- cold start: the service's process start → ready → first token (warm-up request), and the
  engine's own breakdown (imports, load, KV pool, compile, graph capture);
- swap-in → first token through ``/swapserve/v1/completions`` (streamed; every other model is
  swapped out first, so no eviction is counted), with the service's step timings;
- swap-out (manual route), with its steps; the first one (startup snapshot) separately, since
  it pins the staging buffers;
- the raw driver restore of the same state (the ``restore`` step: one cuCheckpointProcessRestore);
- GPU memory: the engine's full footprint, and what was checkpointed.

Usage (on the GPU machine, see bench/gpu_run.sh):
    python bench/swap_latency.py --sizes 1b,8b --cycles 3 --out results_dir
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server import ServerHandle, run_server  # noqa: E402

SHAPES = {"1b": "shape:llama-3.2-1b", "8b": "shape:llama-3.1-8b", "tiny": "shape:tiny"}  # tiny: dry runs on a CPU
ENGINE_LOGS = Path(tempfile.gettempdir()) / "jupyter-swapserve"


def models_file(sizes: list[str], utils: dict[str, float], compile_: bool, graphs: bool, plain: bool,
                torch_saver: bool = False, hugepages: bool = False, keep_residual: bool = False) -> dict:
    models = []
    for size in sizes:
        args = ["--gpu-memory-utilization", str(utils[size]), "--max-model-len", "2048"]
        args += ["--compile"] if compile_ else []
        args += ["--cuda-graphs"] if graphs else []
        # an honest cold start: no inductor/Triton cache from an earlier engine of the same shape
        models.append({"name": f"{size}-aware", "engine": "reference", "model": SHAPES[size], "api": "completion",
                       "args": args, "env": {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}, "start_timeout": 900})
        if hugepages:
            models.append({"name": f"{size}-aware-hp", "engine": "reference", "model": SHAPES[size],
                           "api": "completion", "args": [*args, "--staging", "hugepages"], "start_timeout": 900})
        if keep_residual:
            # residual: keep — after sleep the ~1 GiB the engine still holds stays on the GPU, no checkpoint
            models.append({"name": f"{size}-aware-keep", "engine": "reference", "model": SHAPES[size],
                           "api": "completion", "args": [*args, "--staging", "hugepages"], "residual": "keep",
                           "start_timeout": 900})
        if torch_saver and size == sizes[0]:
            # the same engine releasing memory with plain torch instead of torch-memory-saver
            models.append({"name": f"{size}-aware-torch", "engine": "reference", "model": SHAPES[size],
                           "api": "completion", "args": [*args, "--memory-saver", "torch"], "start_timeout": 900})
        if plain:
            cmd = [sys.executable, "-m", "jupyter_swapserve.reference", "--model", SHAPES[size],
                   "--served-model-name", f"{size}-plain", "--port", "{port}", *args]
            models.append({"name": f"{size}-plain", "engine": "command", "command": cmd, "api": "completion",
                           "start_timeout": 900})
    return {"models": models}


RAW_CHILD = """
import sys, torch
dev_gib, pinned_gib = float(sys.argv[1]), float(sys.argv[2])
x = torch.empty(max(1, int(dev_gib * 2**29)), dtype=torch.bfloat16, device="cuda").normal_()
h = None
if pinned_gib and sys.argv[3] == "h":  # transparent huge pages, registered with the driver
    import mmap
    buf = mmap.mmap(-1, int(pinned_gib * 2**30), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    h = torch.frombuffer(buf, dtype=torch.uint8)
    h.fill_(1)
    assert int(torch.cuda.cudart().cudaHostRegister(h.data_ptr(), h.numel(), 0)) == 0
elif pinned_gib:
    h = torch.empty(int(pinned_gib * 2**30), dtype=torch.uint8, pin_memory=True)
    h.fill_(1)
torch.cuda.synchronize()
print("READY", flush=True)
sys.stdin.readline()
"""


def raw_probe(configs: list[tuple[float, float, str]]) -> list[dict[str, Any]]:
    """Raw driver timings for a bare process holding ``dev`` GiB on the GPU and ``pinned`` GiB of
    pinned host memory: what the checkpoint of an engine's residual costs, and why."""
    from jupyter_swapserve.gpu.checkpoint import CudaCheckpointer

    ck = CudaCheckpointer()
    out = []
    for dev, pinned, kind in configs:
        t_setup = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", RAW_CHILD, str(dev), str(pinned), kind or "p"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("raw probe child did not start")
            used = nvml_pid_gib(proc.pid)
            t = [time.perf_counter()]
            for call, extra in ((ck.lock, (10_000,)), (ck.checkpoint, ()), (ck.restore, ()), (ck.unlock, ())):
                call(proc.pid, *extra)
                t.append(time.perf_counter())
            row = {"device_gib": dev, "pinned_gib": pinned, "host": "huge pages" if kind == "h" else "cudaHostAlloc",
                   "setup_s": t[0] - t_setup, "nvml_gib": used, "lock_s": t[1] - t[0],
                   "checkpoint_s": t[2] - t[1], "restore_s": t[3] - t[2], "unlock_s": t[4] - t[3]}
            print("raw " + json.dumps(row), flush=True)
            out.append(row)
            proc.stdin.write("\n")
            proc.stdin.flush()
        finally:
            proc.kill()
            proc.wait()
    return out


def nvml_pid_gib(pid: int) -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return sum((p.usedGpuMemory or 0) for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                   if p.pid == pid) / 1024**3
    except Exception:
        return None


def engine_log_json(name: str, tag: str) -> list[dict[str, Any]]:
    """The engine's ``TAG {json}`` log lines (STARTUP_TIMINGS, SLEEP, WAKE)."""
    path = ENGINE_LOGS / f"{name}.log"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = re.search(rf"\b{tag} (\{{.*\}})\s*$", line)
        if m:
            out.append(json.loads(m.group(1)))
    return out


def model_status(server: ServerHandle, name: str) -> dict[str, Any]:
    return server.model(name)


def steps(status: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in status["last_steps"]:
        out[s["step"]] = out.get(s["step"], 0.0) + s["seconds"]
    return out


def swap_out(server: ServerHandle, name: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(server.url + f"swapserve/api/models/{name}/swap-out", headers=server.headers(), timeout=900)
    r.raise_for_status()
    return time.perf_counter() - t0


def first_token(server: ServerHandle, name: str, max_tokens: int = 8) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft = None
    with httpx.stream("POST", server.api + "/completions", headers=server.headers(), timeout=900,
                      json={"model": name, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0,
                            "stream": True}) as r:
        r.raise_for_status()
        header = float(r.headers["x-swapserve-swap-in-seconds"])
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and ttft is None:
                if json.loads(line[6:])["choices"][0].get("text"):
                    ttft = time.perf_counter() - t0
    return {"ttft_s": ttft, "swap_in_header_s": header, "total_s": time.perf_counter() - t0}


def nvml_used_gib() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 1024**3
    except Exception:
        return None


def med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = args.sizes.split(",")
    utils = {"1b": args.util_1b, "8b": args.util_8b, "tiny": 0.05}
    spec = models_file(sizes, utils, not args.no_compile, not args.no_graphs, not args.no_plain, args.torch_saver,
                       args.hugepages, args.keep_residual)
    path = Path(tempfile.mkdtemp()) / "bench-models.json"
    path.write_text(json.dumps(spec))
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
           "JUPYTER_CONFIG_PATH": str(ROOT / "jupyter-config")}
    results: dict[str, Any] = {"models": {}, "config": vars(args), "spec": spec}
    if args.raw:
        configs = []
        for c in args.raw.split(","):  # DEV:PINNED[h]
            dev, pinned = c.split(":")
            configs.append((float(dev), float(pinned.rstrip("h")), "h" if pinned.endswith("h") else ""))
        results["raw"] = raw_probe(configs)
    t_start = time.perf_counter()
    with run_server(path, env=env) as server:
        try:
            status = server.wait_models(timeout=args.start_timeout)
        except Exception:
            print(server.log())
            raise
        results["startup_wall_s"] = time.perf_counter() - t_start
        results["device"] = status["devices"][0]
        results["checkpointer"] = status["checkpointer"]
        names = [m["name"] for m in status["models"]]
        for m in status["models"]:
            results["models"][m["name"]] = {
                "engine": m["engine"], "memory_gib": m["memory_gib"],
                "cold_start_s": m["last_cold_start_seconds"],
                "startup_timings": (engine_log_json(m["name"], "STARTUP_TIMINGS") or [{}])[0],
                "first_swap_out_s": m["last_swap_out_seconds"], "first_swap_out_steps": steps(m),
                "cycles": [],
            }
        print("startup done:", json.dumps({n: {k: results["models"][n][k] for k in ("memory_gib", "cold_start_s",
                                                                                   "first_swap_out_s")}
                                           for n in names}), flush=True)
        for cycle in range(args.cycles):
            for name in names:
                for other in names:  # nothing else on the GPU: the swap-in is measured alone
                    if other != name and model_status(server, other)["state"] == "running":
                        swap_out(server, other)
                used_before = nvml_used_gib()
                ft = first_token(server, name)
                st = model_status(server, name)
                ft["swap_in_steps"] = steps(st)
                ft["swap_in_s"] = st["last_swap_in_seconds"]
                ft["used_gib_running"] = nvml_used_gib()
                ft["used_gib_before"] = used_before
                ft["swap_out_s"] = swap_out(server, name)
                st = model_status(server, name)
                ft["swap_out_steps"] = steps(st)
                ft["used_gib_after_out"] = nvml_used_gib()
                results["models"][name]["cycles"].append(ft)
                print(f"cycle {cycle} {name}: " + json.dumps(ft), flush=True)
            partial = Path(args.out) / "partial.json"  # insurance against a cut-off run
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(results, default=str))
        for name in names:
            results["models"][name]["sleep_log"] = engine_log_json(name, "SLEEP")
            results["models"][name]["wake_log"] = engine_log_json(name, "WAKE")
            results["models"][name]["first_token_log"] = engine_log_json(name, "FIRST_TOKEN_AFTER_WAKE")
        results["server_log_tail"] = server.log()[-4000:]
    return results


def summarize(results: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    rows = []
    for name, r in results["models"].items():
        cycles = r["cycles"]
        aware = r["engine"] == "reference"
        sleeps = r.get("sleep_log") or []
        row = {
            "model": name, "path": ("engine-aware" + (" (torch release)" if name.endswith("-torch") else "")
                                    + (" (huge-page staging)" if name.endswith("-hp") else "")
                                    + (" (huge-page staging, residual kept)" if name.endswith("-keep") else ""))
            if aware else "plain checkpoint",
            "engine_first_token_s": med([x.get("seconds") for x in r.get("first_token_log") or []]),
            "memory_gib": r["memory_gib"],
            "checkpointed_gib": (med([s.get("resident_gib") for s in sleeps]) if aware else r["memory_gib"]),
            "weights_gib": (sleeps[0].get("weights_gib") if sleeps else None),
            "cold_start_s": r["cold_start_s"],
            "load_s": r["startup_timings"].get("load_s"), "compile_s": r["startup_timings"].get("compile_s"),
            "graph_s": r["startup_timings"].get("graph_s"), "import_s": r["startup_timings"].get("import_s"),
            "kv_alloc_s": r["startup_timings"].get("kv_alloc_s"),
            "swap_in_ttft_s": med([c["ttft_s"] for c in cycles]),
            "swap_in_s": med([c["swap_in_s"] for c in cycles]),
            "restore_s": med([c["swap_in_steps"].get("restore") for c in cycles]),
            "wake_s": med([c["swap_in_steps"].get("wake") for c in cycles]),
            "swap_out_s": med([c["swap_out_s"] for c in cycles]),
            "checkpoint_s": med([c["swap_out_steps"].get("checkpoint") for c in cycles]),
            "sleep_s": med([c["swap_out_steps"].get("sleep") for c in cycles]),
            "first_swap_out_s": r["first_swap_out_s"],
            "d2h_s": med([s.get("d2h_s") for s in sleeps[1:]] or [s.get("d2h_s") for s in sleeps]),
            "pin_s": sleeps[0].get("pin_s") if sleeps else None,
            "h2d_s": med([w.get("h2d_s") for w in r.get("wake_log") or []]),
            "n": len(cycles),
        }
        if row["swap_in_ttft_s"]:
            row["cold_over_swap_in"] = (row["cold_start_s"] or 0) / row["swap_in_ttft_s"]
            if row["restore_s"]:
                row["ttft_over_restore"] = row["swap_in_ttft_s"] / row["restore_s"]
        rows.append(row)

    def f(v: Any, digits: int = 2) -> str:
        return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    dev = results.get("device", {})
    cfg = results.get("config", {})
    flags = " ".join(f for f, off in (("--compile", cfg.get("no_compile")), ("--cuda-graphs", cfg.get("no_graphs")))
                     if not off) or "eager"
    lines = [
        f"# Swap latency on {dev.get('name', '?')} ({f(dev.get('capacity_gib'), 1)} GiB), "
        f"{results.get('date', '')}",
        "",
        f"Checkpointer: {results.get('checkpointer')}; reference engine, random bf16 weights of the named shape, "
        f"{flags}, medians of {rows[0]['n'] if rows else 0} cycles; swap-in → first token measured "
        "by a client streaming through the Jupyter route with every other model swapped out.",
        "",
        "| model | path | GPU GiB | checkpointed GiB | cold start s (load / compile / graphs) | swap-in → 1st token s "
        "| raw restore s | wake s | swap-out s (first) | cold / swap-in | swap-in / restore |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['path']} | {f(r['memory_gib'])} | {f(r['checkpointed_gib'])} | "
            f"{f(r['cold_start_s'])} ({f(r['load_s'])} / {f(r['compile_s'])} / {f(r['graph_s'])}) | "
            f"{f(r['swap_in_ttft_s'], 3)} | {f(r['restore_s'], 3)} | {f(r['wake_s'], 3)} | "
            f"{f(r['swap_out_s'])} ({f(r['first_swap_out_s'])}) | "
            f"{f(r.get('cold_over_swap_in'), 1)}x | {f(r.get('ttft_over_restore'), 2)}x |")
    lines += [
        "",
        "Engine-aware details (engine's own log): weights copied at PCIe speed to pinned staging buffers that are "
        "pinned once (first sleep) and reused.",
        "",
        "| model | weights GiB | pin (first sleep) s | D2H s | H2D s | sleep step s | checkpoint step s "
        "| engine's first token after wake s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["path"].startswith("engine-aware"):
            lines.append(f"| {r['model']} | {f(r['weights_gib'])} | {f(r['pin_s'])} | {f(r['d2h_s'], 3)} | "
                         f"{f(r['h2d_s'], 3)} | {f(r['sleep_s'], 3)} | {f(r['checkpoint_s'], 3)} | "
                         f"{f(r['engine_first_token_s'], 3)} |")
    if results.get("raw"):
        lines += ["", "Raw driver calls on a bare process (GPU memory and pinned host memory it holds):", "",
                  "| device GiB | pinned host GiB | host memory | NVML GiB | lock ms | checkpoint s | restore s "
                  "| unlock ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in results["raw"]:
            lines.append(f"| {f(x['device_gib'])} | {f(x['pinned_gib'])} | {x.get('host', '')} | {f(x['nvml_gib'])} | "
                         f"{f(1e3 * x['lock_s'], 1)} | {f(x['checkpoint_s'], 3)} | {f(x['restore_s'], 3)} | "
                         f"{f(1e3 * x['unlock_s'], 1)} |")
    return rows, "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1b,8b")
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--util-1b", type=float, default=0.2)
    p.add_argument("--util-8b", type=float, default=0.4)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--no-plain", action="store_true")
    p.add_argument("--torch-saver", action="store_true",
                   help="also run the first size's engine-aware model with --memory-saver torch")
    p.add_argument("--hugepages", action="store_true",
                   help="also run each size's engine-aware model with huge-page staging buffers")
    p.add_argument("--keep-residual", action="store_true",
                   help="also run each size's engine-aware model with residual: keep (no checkpoint after sleep)")
    p.add_argument("--raw", default="", help="raw driver probe first: DEV_GIB:PINNED_GIB,... (e.g. 0:0,0:16,16:0)")
    p.add_argument("--start-timeout", type=float, default=1500)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="h100")
    args = p.parse_args()
    results = run(args)
    results["date"] = dt.date.today().isoformat()
    try:
        results["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    rows, table = summarize(results)
    results["summary"] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{results['date']}-{args.tag}-swap_latency"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{stem}.md").write_text(table)
    (out / "partial.json").unlink(missing_ok=True)
    print(table)


if __name__ == "__main__":
    main()

"""The paper's engines for real under the service (issue 25): vLLM, llama.cpp's llama-server and the
reference engine as the control, each through the real Jupyter route, in one run.

For each engine a server serves three 8B-shape engines of which two fit on the device (m0, m1,
m2, as bench/contention.py does) and measures: the engine's cold start; swap-out; swap-in to first
token with free memory and with an eviction needed; a burst (swaps per served request, goodput)
against the always-on baseline (three that fit, pinned); greedy answers compared after every swap.
vLLM also: sleep level 2 (``l2``: weights reloaded from the files) and the plain checkpoint (``plain``:
vLLM without sleep mode, swapped by the driver alone); vLLM's own ``/sleep`` → ``/wake_up`` → first
token on m0 itself, bypassing the service (the reference the goal is measured against), and the
memory a level-1 sleep leaves on the GPU (CUDA graphs kept). llama.cpp also: its own reload of the
same GGUF from the page cache (a fresh llama-server to its first token: what Ollama does).

    python bench/engines_gpu.py --engines vllm,llama,reference --models-dir /tmp/gpu25/models \
        --llama-server /tmp/gpu25/llama-build/bin/llama-server --vllm-site /tmp/site-vllm --out DIR

``--shape tiny`` runs the same logic on a CPU (the virtual device): reference engines, and llama.cpp
with a tiny GGUF when --llama-server names a CPU build.

A run cut off by its timeout keeps what it measured: the md/json are written after every phase
(marked partial until the run ends), with the service's own log beside them. ``--budget S`` (what
bench/gpu_run.sh passes, from its timeout) skips the always-on baseline when it would not finish in
the time left. ``--from-log LOG`` rebuilds the same tables from the JSON lines a run printed (its
``engines.log``), for a run whose files were lost:

    python bench/engines_gpu.py --from-log engines.log --tag h200-vllm --date 2026-12-02 --out bench/results \
        [--cut-off PHASE] [--note TEXT]

(``--cut-off`` names the phase a killed run was in, ``--note`` says where the log came from; both go into the files.)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
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

from bench.contention import model_in, needs_eviction, pct  # noqa: E402
from tests.server import ServerHandle, run_server  # noqa: E402

NAMES = ("m0", "m1", "m2")
PROMPT = "The capital of France is"
# the paper's table (SwapServeLLM, SC'25 workshops) and vLLM's published sleep-mode wake
PAPER = {"cold_start_s": {"ollama": 4.4, "sglang": 21.7, "vllm": 87.0, "trtllm": 124.0},
         "swap_in_s": {"vllm": "5.5-7.5", "ollama": "0.75-4.6"},
         "vllm_sleep_wake_first_token_s": "0.59 (H100, Qwen3-8B)"}
# vLLM started from the device's interpreter with its own module, not the `vllm` console script: a
# `pip install --target` puts that script in TARGET/bin, and a later `--target --upgrade` of any wheel
# with a script of its own replaces that whole bin/ (pip moves it over), which is how the H200 run of
# 2026-12-02 lost it ("exec: vllm: not found")
VLLM_MODULE = ["-m", "vllm.entrypoints.cli.main", "serve"]


def f(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def med(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---- requests --------------------------------------------------------------------------------------------

def ask(url: str, headers: dict[str, str], model: str, max_tokens: int = 16, timeout: float = 900) -> dict[str, Any]:
    """A greedy streamed completion: its text, time to the first token, and the swap-in the route reports."""
    t0 = time.perf_counter()
    ttft, text = None, ""
    with httpx.stream("POST", url + "/completions", headers=headers, timeout=timeout,
                      json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                            "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code} {r.read()[:300]!r}")
        header = r.headers.get("x-swapserve-swap-in-seconds")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                piece = json.loads(line[6:])["choices"][0].get("text") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text += piece
    return {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "text": text,
            "swap_in_header_s": float(header) if header is not None else None}


class Answers:
    """The first greedy answer of each model, and every later one compared with it."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}
        self.checked = 0
        self.differ: list[dict[str, str]] = []

    def check(self, model: str, text: str, when: str) -> bool:
        same = self.first.setdefault(model, text) == text
        self.checked += 1
        if not same:
            self.differ.append({"model": model, "when": when, "first": self.first[model], "now": text})
        return same

    def summary(self) -> dict[str, Any]:
        return {"compared": self.checked, "identical": self.checked - len(self.differ), "differ": self.differ[:5]}


def swap_out(server: ServerHandle, name: str) -> float:
    t0 = time.perf_counter()
    httpx.post(server.url + f"swapserve/api/models/{name}/swap-out", headers=server.headers(),
               timeout=900).raise_for_status()
    return time.perf_counter() - t0


def swap_out_others(server: ServerHandle, name: str) -> None:
    for m in server.status()["models"]:
        if m["name"] != name and m["state"] == "running":
            swap_out(server, m["name"])


def steps(status: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in status["last_steps"]:
        out[s["step"]] = out.get(s["step"], 0.0) + s["seconds"]
    return out


def wait_settled(server: ServerHandle, timeout: float = 120) -> None:
    """Until no model is mid-swap (an eviction overlaps the next answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(m["state"].startswith("swapping") for m in server.status()["models"]):
            return
        time.sleep(0.05)


# ---- phases ------------------------------------------------------------------------------------------------

def round_robin(server: ServerHandle, rounds: int, answers: Answers) -> list[dict[str, Any]]:
    """(a) one client over m0..m2: each request swaps one in, evicting when two are resident."""
    out = []
    for i in range(rounds * len(NAMES)):
        name = NAMES[i % len(NAMES)]
        wait_settled(server)
        status = server.status()
        evict, state = needs_eviction(status, name), model_in(status, name)["state"]
        r = ask(server.api, server.headers(), name)
        r.update(model=name, was=state, eviction=evict, same=answers.check(name, r["text"], f"round robin {i}"),
                 swap_in_steps=steps(server.model(name)))
        print("rr", json.dumps({k: v for k, v in r.items() if k != "text"}), flush=True)
        out.append(r)
    return out


def free_memory(server: ServerHandle, names: tuple[str, ...], cycles: int, answers: Answers) -> list[dict[str, Any]]:
    """(d) each model swapped in alone (everything else out first), then swapped out by the route."""
    out = []
    for c in range(cycles):
        for name in names:
            wait_settled(server)
            swap_out_others(server, name)
            if server.model(name)["state"] == "running":
                swap_out(server, name)
            r = ask(server.api, server.headers(), name)
            st = server.model(name)
            r.update(model=name, cycle=c, same=answers.check(name, r["text"], f"free memory {c}"),
                     swap_in_s=st["last_swap_in_seconds"], swap_in_steps=steps(st))
            r["swap_out_s"] = swap_out(server, name)
            r["swap_out_steps"] = steps(server.model(name))
            print("free", json.dumps({k: v for k, v in r.items() if k != "text"}), flush=True)
            out.append(r)
    return out


def burst(server: ServerHandle, clients: int, tokens: int) -> dict[str, Any]:
    before = {m["name"]: m["swaps_in"] for m in server.status()["models"]}
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(ask, server.api, server.headers(), NAMES[i % len(NAMES)], tokens)
                   for i in range(clients)]
        results = []
        for fut in futures:
            try:
                results.append(fut.result())
            except Exception as exc:  # counted as not served
                results.append({"error": repr(exc)})
    wall = time.perf_counter() - t0
    after = {m["name"]: m["swaps_in"] for m in server.status()["models"]}
    served = [r for r in results if "error" not in r]
    swaps = sum(after[n] - before[n] for n in after)
    ttfts = [r["ttft_s"] for r in served if r["ttft_s"] is not None]
    summary = {"clients": clients, "served": len(served), "wall_s": wall, "goodput_rps": len(served) / wall,
               "swaps": swaps, "swaps_per_request": swaps / max(1, len(served)),
               "ttft_p50_s": pct(ttfts, 0.5), "ttft_p95_s": pct(ttfts, 0.95),
               "errors": [r["error"] for r in results if "error" in r][:3]}
    print("burst", json.dumps(summary), flush=True)
    return summary


def nvml_pids_gib(pids: list[int]) -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        return sum((p.usedGpuMemory or 0) for p in procs if p.pid in pids) / 1024**3
    except Exception:
        return None


def vllm_own_wake(server: ServerHandle, name: str, port: int, cycles: int, answers: Answers) -> list[dict[str, Any]]:
    """vLLM's own sleep mode on the running engine, bypassing the service: /sleep?level=1, the GPU memory
    it leaves (CUDA graphs kept), /wake_up, first token straight from the engine."""
    base = f"http://127.0.0.1:{port}"
    out = []
    swap_out_others(server, name)
    ask(server.api, server.headers(), name)  # running, through the service, nothing else resident
    wait_settled(server)
    pids = server.model(name)["pids"]
    for c in range(cycles):
        awake_gib = nvml_pids_gib(pids)
        t0 = time.perf_counter()
        httpx.post(base + "/sleep", params={"level": "1"}, timeout=300).raise_for_status()
        t1 = time.perf_counter()
        asleep_gib = nvml_pids_gib(pids)
        httpx.post(base + "/wake_up", timeout=300).raise_for_status()
        t2 = time.perf_counter()
        r = ask(base + "/v1", {}, name)
        r.update(cycle=c, sleep_s=t1 - t0, wake_s=t2 - t1, wake_to_first_token_s=t2 - t1 + (r["ttft_s"] or 0),
                 awake_gib=awake_gib, residual_after_sleep_gib=asleep_gib,
                 same=answers.check(name, r["text"], f"vLLM's own wake {c}"))
        print("own-wake", json.dumps({k: v for k, v in r.items() if k != "text"}), flush=True)
        out.append(r)
    return out


def llama_reload(binary: str, gguf: str, args: list[str], cycles: int, answers: Answers) -> list[dict[str, Any]]:
    """llama.cpp's own path back: a fresh llama-server on the same GGUF (in the page cache by now) to its
    first token, as Ollama loads a model."""
    from jupyter_swapserve.engines.base import free_port

    out = []
    for c in range(cycles):
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen([binary, "-m", gguf, "--alias", "reload", "--host", "127.0.0.1", "--port", str(port),
                                 *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llama-server exited with {proc.returncode}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.02)
            ready = time.perf_counter() - t0
            r = ask(f"http://127.0.0.1:{port}/v1", {}, "reload")
            r.update(cycle=c, ready_s=ready, reload_to_first_token_s=ready + (r["ttft_s"] or 0),
                     same=answers.check("m0", r["text"], f"llama.cpp reload {c}"))
            print("reload", json.dumps({k: v for k, v in r.items() if k != "text"}), flush=True)
            out.append(r)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out


# ---- the models files --------------------------------------------------------------------------------------

def engine_models(engine: str, args: argparse.Namespace, always_on: bool) -> dict[str, Any]:
    """m0..m2 of one engine (two fit), or the always-on baseline (three that fit, pinned)."""
    models: list[dict[str, Any]] = []
    devices = None
    if engine == "reference":
        util = args.baseline_util if always_on else args.util
        fast = [] if args.shape == "tiny" else ["--compile", "--cuda-graphs"]
        for i, name in enumerate(NAMES):
            models.append({"name": name, "engine": "reference", "model": f"shape:{args.ref_shape}", "api": "completion",
                           "args": ["--gpu-memory-utilization", str(util), "--max-model-len", "2048", "--seed", str(i),
                                    "--staging", "hugepages", *fast], "residual": args.residual,
                           "start_timeout": 900})
    elif engine == "vllm":
        env = vllm_env(args.vllm_site)
        command = [args.vllm_python, *VLLM_MODULE]
        folder = str(Path(args.models_dir) / "hf")
        common = ["--max-model-len", "2048", "--dtype", "bfloat16", "--seed", "0"]
        util = args.baseline_util if always_on else args.util
        for i, name in enumerate(NAMES):
            m: dict[str, Any] = {"name": name, "engine": "vllm", "command": command, "model": folder,
                                 "api": "completion", "env": env,
                                 "args": [*common, "--gpu-memory-utilization", str(util)], "residual": args.residual,
                                 "concurrency": 8, "start_timeout": 900}
            if i == 0 and not always_on:
                m["port"] = args.vllm_port  # vLLM's own sleep/wake is called on it directly
            models.append(m)
        if not always_on:
            models.append({"name": "l2", "engine": "vllm", "command": command, "model": folder, "api": "completion",
                           "env": env,
                           "args": [*common, "--gpu-memory-utilization", str(args.util)], "sleep_level": 2,
                           "residual": args.residual, "start_timeout": 900})
            models.append({"name": "plain", "engine": "command", "api": "completion", "env": env, "start_timeout": 900,
                           "command": [*command, folder, "--host", "127.0.0.1", "--port", "{port}",
                                       "--served-model-name", "plain", *common,
                                       "--gpu-memory-utilization", str(args.plain_util)]})
    elif engine == "llama":
        gguf = str(Path(args.models_dir) / "model-f16.gguf")
        for name in NAMES:
            models.append({"name": name, "engine": "llama-server", "command": args.llama_server, "model": gguf,
                           "api": "completion", "args": llama_args(args), "start_timeout": 900})
        # two of them fit in the share of the GPU the service is given, three do not
        devices = [{"memory_gib": args.llama_baseline_gib if always_on else args.llama_capacity_gib}]
    else:
        raise SystemExit(f"unknown engine {engine!r} (vllm, llama, reference)")
    if always_on:
        for m in models:
            m["pinned"] = True
            m["memory_gib"] = args.baseline_gib if engine != "llama" else args.llama_model_gib
    spec: dict[str, Any] = {"models": models}
    if devices and args.shape != "tiny":
        spec["devices"] = devices
    return spec


def vllm_env(site: str) -> dict[str, str]:
    """The vLLM engines' environment: the staged install first on the path. FlashInfer is not staged
    (its kernels compile on first use: minutes of nvcc), and vLLM 0.26's samplers import its attention
    backend to ask whether FlashInfer sampling is supported unless told not to (VLLM_USE_FLASHINFER_SAMPLER=0:
    PyTorch's top-k/top-p instead; greedy answers do not depend on it)."""
    return {"PYTHONPATH": site, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0"}


def llama_args(args: argparse.Namespace) -> list[str]:
    return ["-ngl", "999", "-c", str(args.llama_ctx), "--seed", "0"] if args.shape != "tiny" else ["-c", "512"]


# ---- one engine ----------------------------------------------------------------------------------------------

class Recorder:
    """The run's md/json, written again after every phase: a run cut off by its timeout keeps what
    it measured (marked partial, with the phase it was in), and the service's own log beside them."""

    def __init__(self, out: Path, stem: str, title: str, config: dict[str, Any]) -> None:
        self.out, self.stem, self.title, self.config = out, stem, title, config
        self.results: list[dict[str, Any]] = []
        self.server_logs: dict[str, Path] = {}
        self.started = time.monotonic()
        self.running: str | None = None
        self.rebuilt = False  # --from-log: no clock of the run's own, and a note of where the log came from
        self.note = ""

    def phase(self, name: str | None) -> None:
        """``name`` is about to run (None: the run is complete); what came before is saved now."""
        self.running = name
        self.save(running=name)

    def save(self, running: str | None, cut_off: bool = False) -> None:
        rows, table = summarize(self.results)
        elapsed = ("the time is not in the log" if self.rebuilt
                   else f"{time.monotonic() - self.started:.0f} s into the run")
        note = ("" if running is None else
                f"**Partial**: the run was cut off in the phase '{running}' ({elapsed}).\n\n" if cut_off else
                f"**Partial**: written before the phase '{running}' ({elapsed}); a run that ended here was cut off "
                "in that phase.\n\n")
        (self.out / f"{self.stem}.json").write_text(json.dumps(
            {"date": self.config.get("date"), "config": self.config, "complete": running is None, "running": running,
             "cut_off": cut_off,
             "summary": rows, "paper": PAPER, "results": self.results}, indent=1, default=str))
        extra = f"{self.note}\n\n" if self.note else ""
        (self.out / f"{self.stem}.md").write_text(f"# {self.title}\n\n{note}{extra}{table}")
        for engine, path in self.server_logs.items():
            with contextlib.suppress(OSError):
                shutil.copyfile(path, self.out / f"{self.stem}-{engine}-server.log")


def time_left(args: argparse.Namespace, started: float) -> float:
    return float("inf") if args.budget is None else args.budget - (time.monotonic() - started)


def always_on_needs_s(result: dict[str, Any]) -> float:
    """What the always-on baseline takes: its three engines start one after the other (the startup
    snapshot), as long as the run's own did, then the burst; a margin for the server's start and stop."""
    colds = [m.get("cold_start_s") or 0.0 for n, m in result.get("models", {}).items() if n in NAMES]
    burst = result.get("burst", {}).get("wall_s") or 30.0
    return sum(colds) + burst + 30.0


def run_engine(engine: str, args: argparse.Namespace, rec: Recorder) -> dict[str, Any]:
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
           "JUPYTER_CONFIG_PATH": str(ROOT / "jupyter-config")}
    answers = Answers()
    result: dict[str, Any] = {"engine": engine}
    rec.results.append(result)
    if args.only_baseline:  # the always-on baseline in a device call of its own (vLLM's run does not fit one)
        rec.phase(f"{engine}: always-on baseline")
        result["always_on"] = run_always_on(engine, args, env, rec)
        return result
    spec = engine_models(engine, args, always_on=False)
    if args.shape == "tiny":  # the CPU dry run: a virtual device where two fit
        tiny_sizes(spec, args.tiny_capacity_gib)
    path = Path(tempfile.mkdtemp()) / f"{engine}.json"
    path.write_text(json.dumps(spec))
    result["spec"] = spec
    t0 = time.perf_counter()
    rec.phase(f"{engine}: startup")
    with run_server(path, env=env) as server:
        rec.server_logs[engine] = server.log_path
        try:
            status = server.wait_models(timeout=args.start_timeout)
        except Exception as exc:
            result["startup_error"] = str(exc)[:2000]
            result["server_log_tail"] = server.log()[-6000:]
            print(f"{engine}: startup failed: {str(exc)[:500]}", flush=True)
            return result
        result["startup_wall_s"] = time.perf_counter() - t0
        result["device"] = status["devices"][0]
        result["models"] = {m["name"]: {"memory_gib": m["memory_gib"], "cold_start_s": m["last_cold_start_seconds"],
                                        "first_swap_out_s": m["last_swap_out_seconds"],
                                        "first_swap_out_steps": steps(m), "state": m["state"], "error": m["error"]}
                            for m in status["models"]}
        print(f"{engine}: started in {result['startup_wall_s']:.1f} s: {json.dumps(result['models'])}", flush=True)
        try:
            rec.phase(f"{engine}: free memory")
            result["free"] = free_memory(server, NAMES[:1], args.cycles, answers)
            result["answers"] = answers.summary()
            if engine == "vllm":
                rec.phase(f"{engine}: level 2 and plain checkpoint")
                result["free"] += free_memory(server, ("l2", "plain"), args.cycles, answers)
                rec.phase(f"{engine}: vLLM's own sleep and wake")
                result["own_wake"] = vllm_own_wake(server, "m0", args.vllm_port, args.cycles, answers)
                result["answers"] = answers.summary()
            rec.phase(f"{engine}: round robin")
            result["round_robin"] = round_robin(server, args.rounds, answers)
            result["answers"] = answers.summary()
            if args.burst:
                rec.phase(f"{engine}: burst")
                result["burst"] = burst(server, args.burst, args.tokens)
        except Exception as exc:  # keep what was measured
            result["error"] = repr(exc)[:2000]
            print(f"{engine}: {exc!r}", flush=True)
        log = server.log()
        result["swap_log"] = [line[-400:] for line in log.splitlines()
                              if any(k in line for k in ("swap-in", "swap-out", "residual", "handed over"))][-60:]
        result["server_log_tail"] = log[-4000:]
    if engine == "llama" and args.reload_cycles:
        rec.phase(f"{engine}: llama.cpp's own reload")
        try:
            result["reload"] = llama_reload(args.llama_server, str(Path(args.models_dir) / "model-f16.gguf"),
                                            llama_args(args), args.reload_cycles, answers)
        except Exception as exc:
            result["reload_error"] = repr(exc)[:1000]
    result["answers"] = answers.summary()
    if args.burst and args.baseline:
        left, needs = time_left(args, rec.started), always_on_needs_s(result)
        if left < needs:
            result["always_on"] = {"skipped": f"{max(0.0, left):.0f} s of the budget left, the always-on baseline "
                                              f"needs about {needs:.0f} s (its three engines' cold starts, the burst)"}
            print(f"{engine}: always-on baseline skipped: {result['always_on']['skipped']}", flush=True)
        else:
            rec.phase(f"{engine}: always-on baseline")
            result["always_on"] = run_always_on(engine, args, env, rec)
    return result


def tiny_sizes(spec: dict[str, Any], capacity: float) -> None:
    spec["devices"] = [{"virtual": True, "memory_gib": capacity}]
    for m in spec["models"]:
        m["memory_gib"] = 0.4


def run_always_on(engine: str, args: argparse.Namespace, env: dict[str, str], rec: Recorder) -> dict[str, Any]:
    spec = engine_models(engine, args, always_on=True)
    if args.shape == "tiny":
        tiny_sizes(spec, 3 * args.tiny_capacity_gib)
    path = Path(tempfile.mkdtemp()) / f"{engine}-always-on.json"
    path.write_text(json.dumps(spec))
    print(f"{engine}: always-on baseline", flush=True)  # --from-log: the burst after this line is the baseline's
    with run_server(path, env=env) as server:
        rec.server_logs[f"{engine}-always-on"] = server.log_path
        try:
            server.wait_models(timeout=args.start_timeout)
        except Exception as exc:
            return {"startup_error": str(exc)[:1000], "server_log_tail": server.log()[-3000:]}
        for name in NAMES:  # resident before the burst
            ask(server.api, server.headers(), name)
        return {"burst": burst(server, args.burst, args.tokens)}


# ---- a run rebuilt from its log ------------------------------------------------------------------------------

LOG_LINE = re.compile(r"^(free|own-wake|rr|burst|reload) (\{.*\})\s*$")
STARTED = re.compile(r"^(\w+): started in ([\d.]+) s: (\{.*\})\s*$")
FAILED = re.compile(r"^(\w+): startup failed: (.*)$")
ALWAYS_ON = re.compile(r"^(\w+): always-on baseline\s*$")
KEYS = {"free": "free", "own-wake": "own_wake", "rr": "round_robin", "reload": "reload"}


def results_from_log(text: str) -> list[dict[str, Any]]:
    """The results a run printed, one JSON line per measurement (``free``, ``own-wake``, ``rr``,
    ``burst``, ``reload``), grouped by the engine whose ``started`` line comes before them. A second
    burst of one engine (or one after its 'always-on baseline' line) is the always-on baseline's."""
    results: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    baseline = False
    for line in text.splitlines():
        if m := STARTED.match(line):
            current = {"engine": m[1], "startup_wall_s": float(m[2]), "models": json.loads(m[3])}
            results.append(current)
            baseline = False
        elif m := FAILED.match(line):
            results.append({"engine": m[1], "startup_error": m[2]})
            current = None
        elif (m := ALWAYS_ON.match(line)) and current is not None and current["engine"] == m[1]:
            baseline = True
        elif (m := LOG_LINE.match(line)) and current is not None:
            kind, data = m[1], json.loads(m[2])
            if kind == "burst":
                if baseline or "burst" in current:
                    current["always_on"] = {"burst": data}
                else:
                    current["burst"] = data
            else:
                current.setdefault(KEYS[kind], []).append(data)
    for r in results:
        if "models" not in r:
            continue
        checked = [x for k in KEYS.values() for x in r.get(k, []) if "same" in x]
        differ = [x for x in checked if not x["same"]]
        r["answers"] = {"compared": len(checked), "identical": len(checked) - len(differ),
                        "differ": [{k: x.get(k) for k in ("model", "cycle", "was")} for x in differ][:5]}
        if r.get("burst") and "always_on" not in r:
            r["always_on"] = {"skipped": "not in the log: the run ended before the always-on baseline's burst"}
    return results


# ---- the table ---------------------------------------------------------------------------------------------

def summarize(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    rows = []
    for r in results:
        models = r.get("models", {})
        free = [x for x in r.get("free", []) if x["model"] in NAMES]
        rr = r.get("round_robin", [])
        evict = [x["ttft_s"] for x in rr if x["eviction"]]
        rr_free = [x["ttft_s"] for x in rr if not x["eviction"] and x["was"] != "running"]
        b = r.get("burst", {})
        always_on = r.get("always_on", {})
        base = always_on.get("burst", {})
        row = {
            "engine": r["engine"],
            "cold_start_s": [models[n]["cold_start_s"] for n in NAMES if n in models],
            "memory_gib": models.get("m0", {}).get("memory_gib"),
            "swap_out_s": med([x["swap_out_s"] for x in free]),
            "swap_in_ttft_free_s": med([x["ttft_s"] for x in free] + rr_free),
            "swap_in_ttft_eviction_s": med(evict),
            # every value behind the two medians, in the order measured (free: the m0 cycles, then round robin)
            "swap_in_ttft_free_each_s": [x["ttft_s"] for x in free] + rr_free,
            "swap_in_ttft_eviction_each_s": evict,
            "swaps_per_request": b.get("swaps_per_request"), "goodput_rps": b.get("goodput_rps"),
            "always_on_rps": base.get("goodput_rps"),
            "always_on_note": always_on.get("skipped") or always_on.get("startup_error"),
            "ttft_p50_burst_s": b.get("ttft_p50_s"), "ttft_p95_burst_s": b.get("ttft_p95_s"),
            "answers": r.get("answers"),
            "error": r.get("startup_error") or r.get("error"),
        }
        if r["engine"] == "vllm":
            own = r.get("own_wake", [])
            row["own_wake_to_first_token_s"] = med([x["wake_to_first_token_s"] for x in own])
            row["residual_after_l1_sleep_gib"] = med([x["residual_after_sleep_gib"] for x in own])
            for label in ("l2", "plain"):
                xs = [x for x in r.get("free", []) if x["model"] == label]
                row[f"{label}_swap_in_ttft_s"] = med([x["ttft_s"] for x in xs])
                row[f"{label}_swap_out_s"] = med([x["swap_out_s"] for x in xs])
                row[f"{label}_cold_start_s"] = models.get(label, {}).get("cold_start_s")
                row[f"{label}_memory_gib"] = models.get(label, {}).get("memory_gib")
            if row["own_wake_to_first_token_s"] and row["swap_in_ttft_free_s"]:
                row["free_over_own_wake"] = row["swap_in_ttft_free_s"] / row["own_wake_to_first_token_s"]
            if row["own_wake_to_first_token_s"] and row["swap_in_ttft_eviction_s"]:
                row["eviction_over_own_wake"] = row["swap_in_ttft_eviction_s"] / row["own_wake_to_first_token_s"]
        if r["engine"] == "llama":
            row["reload_to_first_token_s"] = med([x["reload_to_first_token_s"] for x in r.get("reload", [])])
        rows.append(row)

    lines = ["| engine | cold start s (m0 / m1 / m2) | GPU GiB | swap-out s | swap-in → 1st token, free s "
             "| with eviction s | burst swaps/req | goodput req/s (vs always-on) | answers identical | paper |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    paper = {"vllm": "cold 87 s; swap-in 5.5-7.5 s", "llama": "Ollama: cold 4.4 s; swap-in 0.75-4.6 s",
             "reference": "(control)"}
    for row in rows:
        a = row["answers"] or {}
        ratio = (f" ({100 * row['goodput_rps'] / row['always_on_rps']:.0f} %)"
                 if row["goodput_rps"] and row["always_on_rps"] else
                 " (always-on: not run)" if row["goodput_rps"] and row["always_on_note"] else "")
        lines.append(f"| {row['engine']} | {' / '.join(f(c, 1) for c in row['cold_start_s'])} | {f(row['memory_gib'])} "
                     f"| {f(row['swap_out_s'])} | {f(row['swap_in_ttft_free_s'], 3)} "
                     f"| {f(row['swap_in_ttft_eviction_s'], 3)} | {f(row['swaps_per_request'])} "
                     f"| {f(row['goodput_rps'])}{ratio} | {a.get('identical', '-')}/{a.get('compared', '-')} "
                     f"| {paper.get(row['engine'], '')} |")
    lines += ["", "Each swap-in → first token behind the medians (s, in the order measured; free: m0's cycles, "
              "then the round robin's swap-ins that needed no eviction):", ""]
    for row in rows:
        lines.append(f"- {row['engine']}: free {', '.join(f(v, 3) for v in row['swap_in_ttft_free_each_s']) or '-'}; "
                     f"with eviction {', '.join(f(v, 3) for v in row['swap_in_ttft_eviction_each_s']) or '-'}"
                     + (f"; burst TTFT p50 {f(row['ttft_p50_burst_s'], 3)} / p95 {f(row['ttft_p95_burst_s'], 3)}"
                        if row["ttft_p50_burst_s"] is not None else "")
                     + (f"; always-on baseline: {row['always_on_note']}" if row["always_on_note"] else "")
                     + (f"; always-on baseline: {f(row['always_on_rps'])} req/s" if row["always_on_rps"] else ""))
    goals: list[tuple[str, str, bool | None]] = []
    for row in rows:
        if row["engine"] == "vllm":
            own, fr, ev = row["own_wake_to_first_token_s"], row["swap_in_ttft_free_s"], row["swap_in_ttft_eviction_s"]
            lines += ["", "vLLM in detail (goal: free ≤ 1.1x and eviction ≤ 1.3x of vLLM's own wake → first token; "
                      f"vLLM's published figure {PAPER['vllm_sleep_wake_first_token_s']} s):", "",
                      "| vLLM's own /wake_up → 1st token s | service, free s (x) | service, eviction s (x) "
                      "| GPU GiB left by a level-1 sleep | level 2: swap-in → 1st token s / swap-out s "
                      "| plain checkpoint: swap-in → 1st token s / swap-out s |", "|---|---|---|---|---|---|",
                      f"| {f(own, 3)} | {f(fr, 3)} "
                      f"({f(row.get('free_over_own_wake'))}) | {f(ev, 3)} "
                      f"({f(row.get('eviction_over_own_wake'))}) | {f(row['residual_after_l1_sleep_gib'])} "
                      f"| {f(row['l2_swap_in_ttft_s'], 3)} / {f(row['l2_swap_out_s'])} "
                      f"| {f(row['plain_swap_in_ttft_s'], 3)} / {f(row['plain_swap_out_s'])} |"]
            if own and fr:
                goals.append(("vLLM: swap-in → 1st token, free ≤ 1.1x vLLM's own wake and ≤ 0.7 s",
                              f"{fr:.3f} s = {fr / own:.2f}x of {own:.3f} s", fr <= 1.1 * own and fr <= 0.7))
            if own and ev:
                goals.append(("vLLM: with an eviction ≤ 1.3x vLLM's own wake and ≤ 0.8 s",
                              f"{ev:.3f} s = {ev / own:.2f}x of {own:.3f} s", ev <= 1.3 * own and ev <= 0.8))
            a = row["answers"] or {}
            if a.get("compared"):
                goals.append(("vLLM: answers identical", f"{a['identical']}/{a['compared']}",
                              a["identical"] == a["compared"]))
        if row["engine"] == "llama":
            lines += ["", "llama.cpp (goal: checkpoint swap-in faster than its own reload from the page cache):",
                      "", "| service swap-in → 1st token, free s | fresh llama-server → 1st token s |", "|---|---|",
                      f"| {f(row['swap_in_ttft_free_s'], 3)} | {f(row['reload_to_first_token_s'], 3)} |"]
            if row["swap_in_ttft_free_s"] and row["reload_to_first_token_s"]:
                goals.append(("llama.cpp by checkpoint: swap-in faster than its own reload",
                              f"{row['swap_in_ttft_free_s']:.3f} s vs {row['reload_to_first_token_s']:.3f} s",
                              row["swap_in_ttft_free_s"] < row["reload_to_first_token_s"]))
        if row["error"]:
            lines.append(f"\n{row['engine']}: {str(row['error'])[:300]}")
    if goals:
        lines += ["", "Goals (issue 25):", "", "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {g} | {m} | {'met' if ok else 'not met'} |" for g, m, ok in goals]
    return rows, "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="vllm,llama,reference")
    p.add_argument("--models-dir", default="/tmp/gpu25/models", help="make_models.py's OUT (hf/, model-f16.gguf)")
    p.add_argument("--llama-server", default="/tmp/gpu25/llama-build/bin/llama-server")
    p.add_argument("--vllm-site", default="/tmp/site-vllm", help="where device.sh installed vLLM")
    p.add_argument("--vllm-python", default=sys.executable, help="the interpreter vLLM runs under (its module, "
                   "not the `vllm` script)")
    p.add_argument("--vllm-port", type=int, default=18500, help="m0's port, for vLLM's own sleep/wake")
    p.add_argument("--shape", default="llama-3.1-8b", choices=["llama-3.1-8b", "tiny"])
    p.add_argument("--util", type=float, default=0.38, help="each engine's share of the GPU: two fit, three do not")
    p.add_argument("--plain-util", type=float, default=0.2, help="vLLM without sleep mode: all of it is checkpointed")
    p.add_argument("--baseline-util", type=float, default=0.25)
    p.add_argument("--baseline-gib", type=float, default=36.0, help="each always-on engine's size, given up front")
    p.add_argument("--llama-ctx", type=int, default=8192)
    p.add_argument("--llama-model-gib", type=float, default=17.0, help="a llama-server 8B f16 with --llama-ctx")
    p.add_argument("--llama-capacity-gib", type=float, default=40.0, help="the service's share: two fit")
    p.add_argument("--llama-baseline-gib", type=float, default=60.0, help="the always-on share: three fit")
    p.add_argument("--residual", default="auto", choices=["auto", "checkpoint", "keep"])
    p.add_argument("--tiny-capacity-gib", type=float, default=1.0, help="the CPU dry run's virtual device")
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--burst", type=int, default=12)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--reload-cycles", type=int, default=2)
    p.add_argument("--no-baseline", dest="baseline", action="store_false")
    p.add_argument("--only-baseline", action="store_true",
                   help="only the always-on baseline (three engines that fit, pinned, and the burst)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds the whole run may take: the always-on baseline is skipped when it would not fit")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--tag", default="h200")
    p.add_argument("--date", default=dt.date.today().isoformat(), help="the date in the files' names")
    p.add_argument("--from-log", type=Path, default=None,
                   help="rebuild the md/json from the JSON lines of a run's log instead of running")
    p.add_argument("--cut-off", default=None, metavar="PHASE",
                   help="with --from-log: the phase the run was cut off in (the files say so)")
    p.add_argument("--note", default="", help="with --from-log: a paragraph on where the log came from")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    args.ref_shape = "tiny" if args.shape == "tiny" else "llama-3.1-8b"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.date}-{args.tag}-engines"
    title = f"The paper's engines under the service ({args.date}, {args.tag})"
    if args.from_log is not None:
        config = {"date": args.date, "from_log": str(args.from_log),
                  "rebuilt_by": f"python bench/engines_gpu.py --from-log {args.from_log.name} --tag {args.tag} "
                                f"--date {args.date}"}
        rec = Recorder(out, stem, title + ", rebuilt from the run's log", config)
        if args.cut_off:
            config["rebuilt_by"] += f" --cut-off '{args.cut_off}'"
        if args.note:
            config["note"] = args.note
            config["rebuilt_by"] += " --note TEXT"
        rec.rebuilt, rec.note = True, args.note
        rec.results = results_from_log(args.from_log.read_text(errors="replace"))
        rec.save(running=args.cut_off, cut_off=args.cut_off is not None)
        print((out / f"{stem}.md").read_text())
        return
    rec = Recorder(out, stem, title, {**vars(args), "date": args.date})
    # the device call's `timeout` sends SIGTERM: unwind, so that run_server stops the server and its
    # engines (an orphaned engine would hold the GPU for the next call) and the files say where it stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for engine in [e for e in args.engines.split(",") if e]:
            run_engine(engine, args, rec)
    except (SystemExit, KeyboardInterrupt):
        rec.save(running=rec.running, cut_off=True)
        raise
    rec.phase(None)
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()

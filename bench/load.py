"""Load: N concurrent OpenAI clients (async openai) over three models with memory for one.

Starts a real Jupyter server with bench/load_models.yaml (three llama.cpp models, a virtual
device with room for one), or uses --url/--token. Each client sends one request to a model
chosen at random (seeded), half streaming, and records its status, latency and time to first
token; a sampler reads /swapserve/api/status every 20 ms for the largest reserved/capacity.
Prints a table and writes it (and the raw numbers as JSON) under bench/results/.

    python bench/load.py [--clients 200] [--max-tokens 8] [--seed 0] [--url URL --token T]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import httpx
import openai

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tests.server import run_server  # noqa: E402 (the repository root on the path first)

ALLOWED = {200, 429, 503}  # success, quota refusal, queue full / engine unavailable: all told, none lost


@dataclass
class Outcome:
    model: str
    stream: bool
    status: int
    seconds: float
    ttft: float | None
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_client(client: openai.AsyncOpenAI, model: str, api: str, stream: bool, max_tokens: int,
                     start: asyncio.Event) -> Outcome:
    await start.wait()
    t0 = time.perf_counter()
    ttft = None
    try:
        if api == "chat":
            kwargs = {"messages": [{"role": "user", "content": "Say hello."}]}
            create = client.chat.completions.create
        else:
            kwargs = {"prompt": "The capital of France is"}
            create = client.completions.create
        if stream:
            async for _chunk in await create(model=model, max_tokens=max_tokens, stream=True, **kwargs):
                if ttft is None:
                    ttft = time.perf_counter() - t0
        else:
            await create(model=model, max_tokens=max_tokens, **kwargs)
        return Outcome(model, stream, 200, time.perf_counter() - t0, ttft)
    except openai.APIStatusError as exc:
        return Outcome(model, stream, exc.status_code, time.perf_counter() - t0, ttft, str(exc)[:200])
    except openai.APIError as exc:  # connection dropped, timeout: counted as a failure (status 0)
        return Outcome(model, stream, 0, time.perf_counter() - t0, ttft, f"{type(exc).__name__}: {exc}"[:200])


async def sample(url: str, headers: dict[str, str], stop: asyncio.Event, peaks: dict[str, float]) -> None:
    async with httpx.AsyncClient(timeout=30) as h:
        while not stop.is_set():
            status = (await h.get(url + "swapserve/api/status", headers=headers)).json()
            for d in status["devices"]:
                ratio = d["reserved_gib"] / d["capacity_gib"]
                peaks["max_ratio"] = max(peaks.get("max_ratio", 0.0), ratio)
            peaks["samples"] = peaks.get("samples", 0) + 1
            await asyncio.sleep(0.02)


def swaps_in(status: dict) -> int:
    return sum(m["swaps_in"] for m in status["models"])


async def run(url: str, token: str, clients: int, max_tokens: int, seed: int) -> tuple[list[Outcome], dict]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=30) as h:
        before = (await h.get(url + "swapserve/api/status", headers=headers)).json()
    apis = {m["name"]: m["api"] for m in before["models"]}
    rng = random.Random(seed)
    plan = [(rng.choice(sorted(apis)), rng.random() < 0.5) for _ in range(clients)]
    client = openai.AsyncOpenAI(base_url=url + "swapserve/v1", api_key=token, max_retries=0, timeout=900,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=clients + 10)))
    start, stop, peaks = asyncio.Event(), asyncio.Event(), {}
    sampler = asyncio.create_task(sample(url, headers, stop, peaks))
    tasks = [asyncio.create_task(one_client(client, m, apis[m], s, max_tokens, start)) for m, s in plan]
    t0 = time.perf_counter()
    start.set()
    outcomes = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    stop.set()
    await sampler
    await client.close()
    async with httpx.AsyncClient(timeout=30) as h:
        after = (await h.get(url + "swapserve/api/status", headers=headers)).json()
        leftover = sum(m["queue_depth"] + m["in_flight"] for m in after["models"])
    summary = {"clients": clients, "wall_seconds": wall, "swaps": swaps_in(after) - swaps_in(before),
               "max_reserved_over_capacity": peaks.get("max_ratio", 0.0), "status_samples": peaks.get("samples", 0),
               "left_queued_or_in_flight": leftover, "max_tokens": max_tokens, "seed": seed}
    return list(outcomes), summary


def table(outcomes: list[Outcome], summary: dict) -> str:
    ok = [o for o in outcomes if o.status == 200]
    statuses: dict[int, int] = {}
    for o in outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    lat = [o.seconds for o in ok]
    ttft = [o.ttft for o in ok if o.ttft is not None]
    rows = [
        ("clients (concurrent)", f"{summary['clients']}"),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))),
        ("success rate", f"{len(ok) / len(outcomes):.1%}"),
        ("only 200/429/503", "yes" if set(statuses) <= ALLOWED else "NO"),
        ("latency p50 / p99 (s)", f"{percentile(lat, 50):.2f} / {percentile(lat, 99):.2f}"),
        ("TTFT p50 / p99 (s, streams)", f"{percentile(ttft, 50):.2f} / {percentile(ttft, 99):.2f}"),
        ("swaps (in)", f"{summary['swaps']}"),
        ("max reserved / capacity", f"{summary['max_reserved_over_capacity']:.3f} "
                                    f"({summary['status_samples']} samples)"),
        ("left queued or in flight", f"{summary['left_queued_or_in_flight']}"),
        ("wall time (s)", f"{summary['wall_seconds']:.1f}"),
    ]
    lines = ["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="a running server's base URL (default: start one)")
    parser.add_argument("--token", default="")
    parser.add_argument("--label", default="cpu", help="results file label (machine)")
    args = parser.parse_args()

    if args.url:
        outcomes, summary = asyncio.run(run(args.url.rstrip("/") + "/", args.token, args.clients,
                                            args.max_tokens, args.seed))
    else:
        with run_server(HERE / "load_models.yaml") as server:
            server.wait_models()
            outcomes, summary = asyncio.run(run(server.url, server.token, args.clients, args.max_tokens, args.seed))
    text = table(outcomes, summary)
    header = (f"# bench/load.py: {args.clients} concurrent clients, three models with memory for one\n\n"
              f"{platform.node()}, {platform.processor() or platform.machine()}, {date.today()}; "
              f"llama.cpp on the CPU (bench/load_models.yaml), max_tokens {args.max_tokens}, half streaming.\n\n")
    print(text)
    errors = sorted({o.error for o in outcomes if o.status not in (200,)})[:5]
    if errors:
        print("errors:", *errors, sep="\n  ")
    out = HERE / "results" / f"{date.today()}-{args.label}-load"
    out.with_suffix(".md").write_text(header + text + "\n")
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "outcomes": [asdict(o) for o in outcomes]},
                                                   indent=1))
    print(f"written: {out}.md, {out}.json")


if __name__ == "__main__":
    main()

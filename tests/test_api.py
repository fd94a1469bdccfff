"""The OpenAI route end to end: a real Jupyter server, real llama.cpp engines, real models."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import APIStatusError, AuthenticationError, BadRequestError, NotFoundError, OpenAI

from . import integrity
from .server import ServerHandle

pytestmark = pytest.mark.engines

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def client(server: ServerHandle) -> OpenAI:
    return OpenAI(base_url=server.api, api_key=server.token, max_retries=0)


def test_models_list(demo_server: ServerHandle) -> None:
    models = client(demo_server).models.list()
    by_id = {m.id: m for m in models.data}
    assert set(by_id) == {"gemma", "smollm2"}
    assert by_id["gemma"].model_extra["swapserve"]["api"] == "completion"
    assert by_id["smollm2"].model_extra["swapserve"]["api"] == "chat"


def test_startup_snapshot_leaves_every_model_swapped_out(demo_server: ServerHandle) -> None:
    status = demo_server.status()
    for m in status["models"]:
        assert m["last_cold_start_seconds"] is not None and m["last_cold_start_seconds"] > 0
        assert m["swaps_out"] >= 1  # the startup snapshot
        assert m["freezer"] in ("cgroup", "signal")
    assert status["devices"][0]["kind"] == "virtual"


def test_chat_completion_and_stream(demo_server: ServerHandle) -> None:
    c = client(demo_server)
    raw = c.chat.completions.with_raw_response.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0)
    answer = raw.parse()
    text = answer.choices[0].message.content or ""
    assert "Paris" in text, text
    assert answer.model == "smollm2"
    assert float(raw.headers["x-swapserve-swap-in-seconds"]) >= 0
    assert float(raw.headers["x-swapserve-queue-seconds"]) >= 0

    chunks = list(c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=24, temperature=0,
                                            stream=True))
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) > 3, "a streamed answer arrives in several chunks"
    assert "Paris" in "".join(pieces)


def test_completion_and_stream(demo_server: ServerHandle) -> None:
    c = client(demo_server)
    out = c.completions.create(model="gemma", prompt="The capital of France is", max_tokens=12, temperature=0)
    assert len(out.choices[0].text.split()) >= 3
    chunks = list(c.completions.create(model="gemma", prompt="The capital of France is", max_tokens=12,
                                       temperature=0, stream=True))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert streamed == out.choices[0].text  # same answer, streamed chunk by chunk
    assert len(chunks) > 3


def test_alternating_models_swap_every_time(demo_server: ServerHandle) -> None:
    c = client(demo_server)
    c.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=2)  # smollm2 in, gemma out
    before = {m["name"]: m for m in demo_server.status()["models"]}
    assert before["gemma"]["state"] == "swapped_out"
    swapped_headers = []
    fingerprints = []
    for _ in range(3):
        r = c.completions.with_raw_response.create(model="gemma", prompt="Paris is", max_tokens=6, temperature=0,
                                                   logprobs=3)
        assert r.parse().choices[0].text.strip()
        fingerprints.append(integrity.logprobs_fingerprint(r.parse().choices[0]))
        swapped_headers.append(float(r.headers["x-swapserve-swap-in-seconds"]))
        r = c.chat.completions.with_raw_response.create(model="smollm2", messages=CHAT, max_tokens=8)
        assert r.parse().choices[0].message.content
        swapped_headers.append(float(r.headers["x-swapserve-swap-in-seconds"]))
    # the same model again: nothing to swap, and the header says so
    r = c.chat.completions.with_raw_response.create(model="smollm2", messages=CHAT, max_tokens=2)
    assert float(r.headers["x-swapserve-swap-in-seconds"]) == 0
    after = {m["name"]: m for m in demo_server.status()["models"]}
    # the device has room for one model only: each request found its model swapped out
    assert after["gemma"]["swaps_in"] - before["gemma"]["swaps_in"] == 3
    assert after["smollm2"]["swaps_in"] - before["smollm2"]["swaps_in"] == 3
    assert all(s > 0 for s in swapped_headers)
    # llama.cpp offers no view of its weights: the logprobs of a fixed greedy completion stand for its
    # logits, the same after every swap (on the virtual device a swap moves no memory: see docs/testing.md)
    assert fingerprints[0] == fingerprints[1] == fingerprints[2] and fingerprints[0][1]
    for m in after.values():
        assert m["last_swap_in_seconds"] > 0 and m["last_swap_out_seconds"] > 0
        assert [s["step"] for s in m["last_steps"]]
        assert len(m["swap_in_history"]) >= 3
    device = demo_server.status()["devices"][0]
    assert device["reserved_gib"] <= device["capacity_gib"]


def test_twenty_concurrent_requests_never_exceed_capacity(demo_server: ServerHandle) -> None:
    c = client(demo_server)
    stop = threading.Event()
    seen: list[tuple[float, float]] = []

    def checker() -> None:
        with httpx.Client(headers=demo_server.headers(), timeout=10) as h:
            while not stop.is_set():
                for d in h.get(demo_server.url + "swapserve/api/status").json()["devices"]:
                    seen.append((d["reserved_gib"], d["capacity_gib"]))
                time.sleep(0.02)

    def one(i: int) -> str:
        if i % 2:
            return c.completions.create(model="gemma", prompt=f"Number {i} is", max_tokens=4).choices[0].text
        return c.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": f"Say {i}"}],
                                         max_tokens=4).choices[0].message.content or ""

    watcher = threading.Thread(target=checker)
    watcher.start()
    try:
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(one, range(20)))
    finally:
        stop.set()
        watcher.join()
    assert len(answers) == 20 and all(a.strip() for a in answers)
    assert len(seen) > 5
    assert all(reserved <= capacity + 1e-6 for reserved, capacity in seen)
    status = demo_server.status()
    assert all(m["queue_depth"] == 0 and m["in_flight"] == 0 for m in status["models"])


def test_disconnect_mid_stream_frees_the_slot(demo_server: ServerHandle) -> None:
    # the base model rarely stops early: 400 tokens keep it busy for seconds
    body = {"model": "gemma", "prompt": "Once upon a time, in a land far away,", "max_tokens": 400, "stream": True}
    with httpx.Client(timeout=60) as h, h.stream("POST", demo_server.api + "/completions", json=body,
                                                 headers=demo_server.headers()) as r:
        assert r.status_code == 200
        chunks = r.iter_bytes()
        assert next(chunks).startswith(b"data: ")
        assert demo_server.model("gemma")["in_flight"] == 1
        r.close()  # hang up mid-stream
    hung_up = time.monotonic()
    while time.monotonic() < hung_up + 10 and demo_server.model("gemma")["in_flight"]:
        time.sleep(0.05)
    m = demo_server.model("gemma")
    assert m["in_flight"] == 0 and m["queue_depth"] == 0
    # the engine is free again: a new request is answered, and the device's books balance
    out = client(demo_server).completions.create(model="gemma", prompt="Paris is", max_tokens=4)
    assert out.choices[0].text
    device = demo_server.status()["devices"][0]
    assert device["reserved_gib"] == demo_server.model("gemma")["reserved_gib"] <= device["capacity_gib"]


def test_manual_swap_routes(demo_server: ServerHandle) -> None:
    h = demo_server.headers()
    r = httpx.post(demo_server.url + "swapserve/api/models/gemma/swap-in", headers=h, timeout=60)
    assert r.status_code == 200 and r.json()["state"] == "running"
    assert demo_server.model("gemma")["state"] == "running"
    assert demo_server.model("smollm2")["state"] == "swapped_out"  # evicted: room for one
    r = httpx.post(demo_server.url + "swapserve/api/models/gemma/swap-out", headers=h, timeout=60)
    assert r.status_code == 200 and r.json() == {"model": "gemma", "swapped": True, "state": "swapped_out"}
    assert demo_server.status()["devices"][0]["reserved_gib"] == 0
    r = httpx.post(demo_server.url + "swapserve/api/models/nope/swap-in", headers=h, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "model"),
        (b'{"model": "smollm2"}', 400, "messages"),
        (b'{"model": "smollm2", "messages": "hi"}', 400, "messages"),
        (b'{"model": "smollm2", "messages": [{"content": "x"}]}', 400, "messages[0].role"),
        (b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}', 400,
         "max_tokens"),
        (b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', 400, "model"),
    ],
)
def test_bad_chat_input_is_a_400_naming_the_field(demo_server: ServerHandle, body: bytes, status: int,
                                                  param: str | None) -> None:
    r = httpx.post(demo_server.api + "/chat/completions", content=body, headers=demo_server.headers(), timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_bad_completion_input_and_unknown_model(demo_server: ServerHandle) -> None:
    c = client(demo_server)
    with pytest.raises(BadRequestError) as exc:
        c.completions.create(model="gemma", prompt=None)  # type: ignore[arg-type]
    assert exc.value.body["param"] == "prompt"
    with pytest.raises(NotFoundError) as nf:
        c.chat.completions.create(model="llama-405b", messages=CHAT)
    assert nf.value.body["code"] == "model_not_found"
    assert "gemma" in nf.value.body["message"] and "smollm2" in nf.value.body["message"]


def test_authentication(demo_server: ServerHandle) -> None:
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=demo_server.api, api_key="wrong", max_retries=0).models.list()
    r = httpx.post(demo_server.api + "/chat/completions", json={"model": "smollm2", "messages": CHAT}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.get(demo_server.url + "swapserve/api/status", timeout=10)
    assert r.status_code == 401
    # the Jupyter "token" scheme works as well as Bearer
    r = httpx.get(demo_server.api + "/models", headers={"Authorization": f"token {demo_server.token}"}, timeout=10)
    assert r.status_code == 200


def test_status_events_stream(demo_server: ServerHandle) -> None:
    with httpx.Client(timeout=30) as h, h.stream("GET", demo_server.url + "swapserve/api/events",
                                                 headers=demo_server.headers()) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "event: status"
        data = next(lines)
        assert data.startswith("data: ") and '"models"' in data


def test_unexpected_exception_type_maps_to_openai_error(demo_server: ServerHandle) -> None:
    r = httpx.get(demo_server.api + "/chat/completions", headers=demo_server.headers(), timeout=10)
    assert r.status_code == 405
    assert r.json()["error"]["message"]
    with pytest.raises(APIStatusError) as info:
        client(demo_server).with_options(max_retries=0).post("/completions", cast_to=dict, body={"model": "gemma"})
    # a request without its prompt is the client's mistake, named, never a server error
    assert info.value.status_code == 400
    error = info.value.response.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "missing_required_parameter"


def test_prefetch_hint_route(demo_server: ServerHandle) -> None:
    r = httpx.post(demo_server.url + "swapserve/api/models/smollm2/prefetch", headers=demo_server.headers(),
                   timeout=30)
    assert r.status_code in (200, 202), r.text
    assert r.json()["model"] == "smollm2"
    # the demo device may be busy with another test's model: the hint may be declined, never an error
    assert r.json()["prefetch"] in ("running", "starting") or r.json()["prefetch"].startswith("declined")
    r = httpx.post(demo_server.url + "swapserve/api/models/nosuch/prefetch", headers=demo_server.headers(),
                   timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.post(demo_server.url + "swapserve/api/models/smollm2/prefetch", timeout=30).status_code == 401

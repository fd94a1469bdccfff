"""An engine as a podman container, driven through podman-py (the podman REST API).

The container is the unit: created from the model's ``image`` with the adapter's command line as
its entrypoint, the engine port published on 127.0.0.1 only, GPUs through CDI
(``nvidia.com/gpu=<index>``), labelled as ours. ``podman pause``/``unpause`` is the freezer; the
engine's host PIDs (for the CUDA checkpoint and NVML matching) are the container's init process
and its descendants, read from /proc.

The service: the socket in ``SWAPSERVE_PODMAN_URL`` (or ``c.SwapServe.podman_url``), else a
``podman system service`` started for this server on a private socket. Leftover containers of
servers that died without cleaning up (their owner PID is gone) are removed on first connect.

podman-py is synchronous: every call runs in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..config import ModelConfig
from ..engines.base import LaunchSpec
from . import procfs
from .gate import EngineGate, GateError, open_gate
from .process import RuntimeStepError, die_with_parent

log = logging.getLogger(__name__)

T = TypeVar("T")

LABEL = "io.jupyter-swapserve"
OWNER_LABEL = "io.jupyter-swapserve.owner"
MODEL_LABEL = "io.jupyter-swapserve.model"
URL_ENV = "SWAPSERVE_PODMAN_URL"
#: where CDI specs live (nvidia-ctk cdi generate); without one, podman cannot hand GPUs over
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")

_LIVE: weakref.WeakSet[PodmanRuntime] = weakref.WeakSet()
_SERVICES: weakref.WeakSet[PodmanService] = weakref.WeakSet()


class PodmanUnavailable(RuntimeStepError):
    """podman is not installed, or its service cannot be reached or started."""


def owner_token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{procfs.start_ticks(pid) or '0'}"


def owner_alive(token: str) -> bool:
    pid_text, _, start = token.partition(":")
    if not pid_text.isdigit():
        return False
    return procfs.start_ticks(int(pid_text)) == start


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, by PID."""
    return sorted(procfs.descendants(root))


def cdi_gpus_available() -> bool:
    return any(Path(d).is_dir() and any(Path(d).glob("nvidia*")) for d in CDI_DIRS)


def parse_volume(spec: str) -> tuple[str, str, str]:
    """``host:container[:ro|rw]`` → (host, container, mode); a bare path binds at the same place."""
    parts = spec.split(":")
    if len(parts) == 1:
        return parts[0], parts[0], "ro"
    if len(parts) == 2:
        if parts[1] in ("ro", "rw"):
            return parts[0], parts[0], parts[1]
        return parts[0], parts[1], "rw"
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        return parts[0], parts[1], parts[2]
    raise ValueError(f"volume '{spec}' is not host:container[:ro|rw]")


def _k8s_log_text(line: str) -> str:
    """k8s-file log lines are ``TIME STREAM F|P text``: the text only."""
    parts = line.split(" ", 3)
    return parts[3] if len(parts) == 4 and parts[2] in ("F", "P") else line


class PodmanService:
    """One connection to podman for this server: a given socket, or a service we started."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url
        self._client: Any = None
        self._service: subprocess.Popen[bytes] | None = None
        self._socket_dir: str | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.leftovers_removed: list[str] = []
        _SERVICES.add(self)

    def _connect_lock(self) -> asyncio.Lock:
        # one lock per event loop: a lock that ever waited is bound to its loop (tests run many)
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def client(self) -> Any:
        """A connected PodmanClient. Raises PodmanUnavailable with the reason."""
        async with self._connect_lock():
            if self._client is not None:
                return self._client
            try:
                from podman import PodmanClient
            except ImportError:
                raise PodmanUnavailable(
                    "podman-py is not installed (pip install podman): container models cannot run") from None
            url = self.url or os.environ.get(URL_ENV) or await self._start_service()
            client = PodmanClient(base_url=url, timeout=60)
            try:
                await asyncio.to_thread(client.ping)
            except Exception as exc:  # any transport error means the same to the user
                client.close()
                raise PodmanUnavailable(f"podman service at {url} is unreachable: {exc}") from None
            self._client = client
            await asyncio.to_thread(self._remove_leftovers)
            return client

    async def _start_service(self) -> str:
        """``podman system service`` on a private socket. Spawned from the event loop's thread, not a
        worker thread: the parent-death signal fires when the spawning *thread* exits."""
        binary = shutil.which("podman")
        if binary is None:
            raise PodmanUnavailable(
                "podman is not installed (apt-get install podman runc), so container models cannot run")
        sock = self._spawn_service(binary)
        url = f"unix://{sock}"
        assert self._service is not None and self._socket_dir is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if sock.exists():
                return url
            if self._service.poll() is not None:
                lines = (Path(self._socket_dir) / "service.log").read_text(errors="replace").strip().splitlines()
                self.close()  # the next start tries afresh
                raise PodmanUnavailable(f"podman system service exited: {lines[-1] if lines else 'no output'}")
            await asyncio.sleep(0.05)
        self.close()
        raise PodmanUnavailable("podman system service did not open its socket within 20 s")

    def _spawn_service(self, binary: str) -> Path:
        """Start the service (a fork and exec: quick enough for the loop's thread); its socket path."""
        self._socket_dir = tempfile.mkdtemp(prefix="swapserve-podman-")
        sock = Path(self._socket_dir) / "podman.sock"
        with open(Path(self._socket_dir) / "service.log", "wb") as log_file:
            # --time=0: never exit while idle; the service dies with this server (parent-death signal)
            self._service = subprocess.Popen(
                [binary, "system", "service", "--time=0", f"unix://{sock}"], stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=log_file, preexec_fn=die_with_parent)
        return sock

    def connected_client(self) -> Any:
        """The client if connected, else None (for the synchronous clean-up at exit)."""
        return self._client

    def _remove_leftovers(self) -> None:
        """Containers labelled as ours whose owning server is gone (killed outright): remove them."""
        try:
            found = self._client.containers.list(all=True, filters={"label": f"{LABEL}=1"})
        except Exception as exc:
            log.warning("cannot list leftover containers: %s", exc)
            return
        for container in found:
            owner = (container.labels or {}).get(OWNER_LABEL, "")
            if owner_alive(owner):
                continue
            with contextlib.suppress(Exception):
                container.remove(force=True)
                self.leftovers_removed.append(container.name)
                log.warning("removed leftover container %s of a server that is gone", container.name)

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self._service is not None:
            self._service.terminate()
            try:
                self._service.wait(10)
            except subprocess.TimeoutExpired:
                self._service.kill()
                self._service.wait()
            self._service = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


class PodmanRuntime:
    """One engine container. Not reusable across restarts: make a new one per start.

    Offers the same interface as :class:`ProcessRuntime` (start, running, wait, pids, log_tail,
    freeze, thaw, stop, kill), so the scheduler cannot tell them apart."""

    kind = "podman"
    freezer = "podman pause"

    def __init__(self, name: str, config: ModelConfig, service: PodmanService) -> None:
        self.name = name
        self.config = config
        self.service = service
        self.container: Any = None
        self.container_name: str | None = None
        self.frozen = False
        self._pid: int | None = None
        self._log_path: str | None = None
        self._exit_code: int | None = None
        self._argv0 = ""
        self.gate: EngineGate | None = None
        _LIVE.add(self)

    async def _call(self, step: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A blocking podman-py call in a thread; any failure becomes a RuntimeStepError naming the step."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except RuntimeStepError:
            raise
        except Exception as exc:  # podman-py raises APIError, requests errors, ...
            message = getattr(exc, "explanation", None) or str(exc) or type(exc).__name__
            raise RuntimeStepError(f"podman {step} of {self.container_name or self.name}: {message}") from None

    # ---- lifecycle -------------------------------------------------------------------------
    def create_kwargs(self, spec: LaunchSpec) -> dict[str, Any]:
        """podman-py ``containers.create`` arguments for this engine (pure: tested alone)."""
        cfg = self.config
        mounts: dict[str, dict[str, Any]] = {}
        for volume in [*spec.mounts, *cfg.volumes]:
            host, inside, mode = parse_volume(volume)
            mounts[host] = {"bind": inside, "mode": mode}
        if spec.unix_socket:
            # the engine's socket directory, the same path inside: the engine makes its socket there
            directory = os.path.dirname(spec.unix_socket)
            mounts[directory] = {"bind": directory, "mode": "rw"}
        kwargs: dict[str, Any] = {
            "name": self.container_name,
            # the adapter's command line is the whole command: an image's own entrypoint is not prefixed
            "entrypoint": list(spec.argv),
            "command": [],
            "environment": dict(spec.env),
            "labels": {LABEL: "1", OWNER_LABEL: owner_token(), MODEL_LABEL: self.name},
            "volumes": mounts,
            "init": True,  # catatonit as PID 1: forwards SIGTERM, reaps the engine's children
        }
        if spec.unix_socket:
            kwargs["network_mode"] = "none"  # no network at all: the socket is the engine's only door
        else:
            # the engine listens on all interfaces of its own network namespace; published on loopback only
            kwargs["ports"] = {f"{spec.port}/tcp": ("127.0.0.1", spec.port)}
        if cfg.shm_size:
            kwargs["shm_size"] = cfg.shm_size
        if cdi_gpus_available():
            kwargs["devices"] = [f"nvidia.com/gpu={d}" for d in cfg.devices]
        return kwargs

    async def start(self, spec: LaunchSpec) -> None:
        image = self.config.image or ""
        client = await self.service.client()
        if not await self._call("image lookup", client.images.exists, image):
            # never pulled here: a pull of many GiB would hang the start, and nodes often have no registry
            raise RuntimeStepError(
                f"image '{image}' is not in local storage; load it first (podman load -i FILE, or "
                f"podman pull {image} where a registry is reachable); it is never pulled automatically")
        self._argv0 = spec.argv[0] if spec.argv else ""
        self.container_name = f"swapserve-{self.name}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        try:
            kwargs = self.create_kwargs(spec)
        except ValueError as exc:
            raise RuntimeStepError(f"field 'volumes': {exc}") from None
        try:
            self.gate = await open_gate(spec)
        except (GateError, OSError) as exc:
            raise RuntimeStepError(str(exc)) from None
        try:
            self.container = await self._call("create", client.containers.create, image, **kwargs)
        except RuntimeStepError:
            self.kill()
            raise
        try:
            await self._call("start", self.container.start)
            attrs = await self._call("inspect", self.container.inspect)
        except RuntimeStepError:
            await self.stop()
            raise
        self._pid = int(attrs.get("State", {}).get("Pid") or 0) or None
        self._log_path = (attrs.get("HostConfig", {}).get("LogConfig", {}).get("Path")
                          or attrs.get("LogPath") or None)
        if self._pid is None:
            state = attrs.get("State", {})
            self._exit_code = int(state.get("ExitCode") or 0)
        log.info("started %s: container %s pid=%s", self.name, self.container_name, self._pid)

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def running(self) -> bool:
        if self._pid is None or self._exit_code is not None:
            return False
        return procfs.exists(self._pid)

    async def wait(self) -> int:
        """Until the container's init process is gone; then its exit code from podman."""
        # the init process is conmon's child, not ours: poll /proc (cheap) rather than hold a
        # thread in a blocking podman wait call for the container's whole life
        while True:
            if not self.running:
                break
            await asyncio.sleep(0.25)
        if self._exit_code is None:
            self._exit_code = -1
            if self.container is not None:
                with contextlib.suppress(RuntimeStepError):
                    attrs = await self._call("inspect", self.container.inspect)
                    self._exit_code = int(attrs.get("State", {}).get("ExitCode") or 0)
        return self._exit_code

    def pids(self) -> list[int]:
        """The container's processes by host PID: its init and everything below it."""
        if not self.running or self._pid is None:
            return []
        return descendants(self._pid)

    def log_tail(self, lines: int = 20) -> str:
        if not self._log_path or not os.path.exists(self._log_path):
            return ""
        with open(self._log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
        tail = [_k8s_log_text(line) for line in text.splitlines()[-lines:]]
        if any("failed to exec pid1" in line for line in tail):
            # catatonit's own words do not say what it could not run
            tail.append(f"the engine command '{self._argv0}' cannot be run in image '{self.config.image}' "
                        f"(not found on its PATH, or not executable)")
        return "\n".join(tail)

    # ---- freezer ---------------------------------------------------------------------------
    async def freeze(self) -> None:
        if not self.running:
            raise RuntimeStepError("container is not running")
        await self._pause_or_unpause("pause", self.container.pause, "paused")
        self.frozen = True

    async def thaw(self) -> None:
        if self.container is not None and self.frozen:
            await self._pause_or_unpause("unpause", self.container.unpause, "running")
        self.frozen = False

    async def _pause_or_unpause(self, step: str, call: Callable[[], None], wanted: str) -> None:
        """A refused pause/unpause is fine when the container is in the wanted state all the same
        (someone ran ``podman pause`` by hand); otherwise the step fails and the swap unwinds."""
        try:
            await self._call(step, call)
        except RuntimeStepError:
            if await self.status() != wanted:
                raise

    async def status(self) -> str | None:
        """podman's word for the container's state (running, paused, exited, ...), None if gone."""
        if self.container is None:
            return None
        try:
            attrs = await self._call("inspect", self.container.inspect)
        except RuntimeStepError:
            return None
        return str(attrs.get("State", {}).get("Status") or "") or None

    # ---- stop ------------------------------------------------------------------------------
    async def stop(self, timeout: float = 10.0) -> None:
        if self.container is None:
            return
        if self.frozen and self.running:
            with contextlib.suppress(RuntimeStepError):
                await self.thaw()  # a paused container cannot act on SIGTERM
        if self.running:
            with contextlib.suppress(RuntimeStepError):
                await self._call("stop", self.container.stop, timeout=max(1, int(timeout)))
        await self._call("remove", self._remove)
        if self.gate is not None:
            self.gate.close()
        log.info("removed container %s of %s", self.container_name, self.name)
        if self._exit_code is None:
            self._exit_code = -1
        _LIVE.discard(self)

    def _remove(self) -> None:
        try:
            self.container.remove(force=True)
        except Exception as exc:
            if "no such container" not in str(exc).lower() and getattr(exc, "status_code", 0) != 404:
                raise

    def kill(self) -> None:
        """Synchronous last resort (server exit): remove the container by force."""
        if self.container is not None:
            with contextlib.suppress(Exception):
                self._remove()
        if self.gate is not None:
            self.gate.close()


@atexit.register
def _remove_all_at_exit() -> None:
    # a server that exits without a clean shutdown leaves no container behind (SIGKILL is
    # covered by the leftover sweep of the next server)
    for runtime in list(_LIVE):
        runtime.kill()
    for service in list(_SERVICES):
        service.close()

"""``swap: interposer``: any CUDA engine gets a sleep hook from the allocation interposer.

The model's own adapter (llama-server, command, reference, ...) still says how to launch the
engine and how to talk to it; this wrapper adds the interposer to its launch (``LD_PRELOAD`` and
the control socket's path; for podman, both bind-mounted) and answers ``sleep``/``wake`` through
the socket (jupyter_swapserve.gpu.interposer) instead of the engine's HTTP hook. So the scheduler
runs the engine-aware sequence unchanged: sleep → the residual's policy (kept, checkpointed, auto)
→ freeze, and thaw → restore → wake.

Honest limits: once the engine is ready the wrapper asks the library what it captured. If the
engine did not load it (a statically linked program), allocates in a way it cannot release
(managed memory, memory pools) or captured nothing, the model falls back to the path it has without
the interposer (the engine's own sleep hook where it has one, else the checkpoint of everything:
lock → checkpoint → freeze) and ``swap_note`` says why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import httpx

from ..gpu.interposer import (
    InterposerClient,
    InterposerError,
    InterposerUnavailable,
    engine_env,
    library_path,
    prepare_socket_dir,
)
from .base import EngineAdapter, EngineError, LaunchSpec

log = logging.getLogger(__name__)

#: how long a ready engine may take to start serving its socket (it binds at its first allocation)
SERVING_TIMEOUT = 10.0


def socket_root() -> Path:
    """This user's private directory for the control sockets (0700, checked: /tmp is shared)."""
    root = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"jupyter-swapserve-{os.geteuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    st = root.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise EngineError(f"{root} is not a directory of this user: refusing to put control sockets under it")
    os.chmod(root, 0o700)
    return root


def socket_dir_name(model_name: str) -> str:
    """A short, safe directory name per model (a socket path is limited to 107 bytes)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)[:40]
    return f"{safe}-{hashlib.sha256(model_name.encode()).hexdigest()[:8]}"


class InterposerSleep(EngineAdapter):
    """The model's adapter, with the interposer as its sleep hook."""

    supports_sleep: ClassVar[bool] = True  # per instance: false once a capture problem is known

    def __init__(self, inner: EngineAdapter, root: Path | None = None) -> None:
        super().__init__(inner.model)
        self.inner = inner
        self.name = inner.name  # the engine's name, as in status and logs
        self.supports_stream_usage = inner.supports_stream_usage
        self.follows = inner.follows
        #: where the control sockets' directories go (default: socket_root(), this user's private one)
        self.sockets_dir = root
        self.client: InterposerClient | None = None
        #: why this model uses the checkpoint path instead (None: the interposer serves it)
        self.swap_note: str | None = None
        self._checked = False
        #: the library's last sleep / wake (steps with seconds), for logs and benchmarks
        self.last_result: dict[str, Any] = {}
        self._http: httpx.AsyncClient | None = None
        self._url = ""

    # ---- launch: the model's own command, with the library loaded -----------------------------
    def launch_spec(self, port: int) -> LaunchSpec:
        spec = self.inner.launch_spec(port)
        try:
            library = library_path()
        except InterposerUnavailable as exc:
            raise EngineError(f"swap: interposer: {exc}") from None
        try:
            sock = prepare_socket_dir((self.sockets_dir or socket_root()) / socket_dir_name(self.model.name))
        except (OSError, InterposerError) as exc:
            raise EngineError(f"swap: interposer: the control socket's directory: {exc}") from None
        spec.env.update(engine_env(sock, library, base={**os.environ, **spec.env}))
        if self.model.runtime == "podman":
            # the same paths inside the container: the library read-only, the socket's directory writable
            spec.mounts += [str(library), f"{sock.parent}:{sock.parent}:rw"]
        self.client = InterposerClient(sock)
        self.supports_sleep = True  # a new engine process: asked again once ready
        self.swap_note = None
        self._checked = False
        return spec

    @property
    def bind_host(self) -> str:
        return self.inner.bind_host

    def upstream_model_name(self) -> str:
        return self.inner.upstream_model_name()

    def warmup_request(self) -> tuple[str, dict[str, Any]]:
        return self.inner.warmup_request()

    async def count_tokens(self, client: httpx.AsyncClient, base_url: str, text: str) -> int | None:
        return await self.inner.count_tokens(client, base_url, text)

    # ---- ready: and what did the library capture? ---------------------------------------------
    async def is_ready(self, client: httpx.AsyncClient, base_url: str) -> bool:
        if not await self.inner.is_ready(client, base_url):
            return False
        if not self._checked:
            self._checked = True
            await self._check_capture()
        return True

    async def _check_capture(self) -> None:
        assert self.client is not None
        try:
            status = await self.client.wait_serving(SERVING_TIMEOUT)
        except InterposerError as exc:
            self._fall_back(f"the engine does not serve the interposer's socket ({exc})")
            return
        problem = status.capture_problem()
        if problem:
            self._fall_back(problem)
            return
        # pin the staging now, while the engine starts, so its first sleep moves bytes only
        try:
            prepared = await self.client.prepare()
        except InterposerError as exc:
            log.warning("%s: pinning the interposer's staging failed (the first sleep pins it): %s",
                        self.model.name, exc)
            return
        log.info("%s: interposer captures %d allocations, %.2f GiB (%.2f GiB resident); staging pinned in %.2f s",
                 self.model.name, status.captured_count, status.captured_bytes / 2**30, status.resident_bytes / 2**30,
                 prepared.seconds)

    def _fall_back(self, reason: str) -> None:
        self.supports_sleep = self.inner.supports_sleep
        path = "the engine's own sleep hook" if self.inner.supports_sleep else "the checkpoint path"
        self.swap_note = f"{path}: {reason}"
        log.warning("%s: swap: interposer falls back to %s: %s", self.model.name, path, reason)

    @property
    def swap_path(self) -> str:
        return f"interposer (fallback to {self.swap_note})" if self.swap_note else "interposer"

    # ---- the sleep hook ------------------------------------------------------------------------
    async def sleep(self, client: httpx.AsyncClient, base_url: str) -> None:
        self._http, self._url = client, base_url
        await self._swap("sleep")

    async def wake(self, client: httpx.AsyncClient, base_url: str) -> None:
        self._http, self._url = client, base_url
        await self._swap("wake")

    async def _swap(self, op: str) -> None:
        if self.swap_note is not None and self.inner.supports_sleep:
            hook = self.inner.sleep if op == "sleep" else self.inner.wake
            assert self._http is not None
            await hook(self._http, self._url)
            return
        if self.client is None or not self.supports_sleep:
            raise EngineError(f"interposer {op}: {self.swap_note or 'the engine was not started with it'}")
        try:
            result = await (self.client.sleep() if op == "sleep" else self.client.wake())
        except InterposerError as exc:
            # the library undid the failed step (asleep after a failed wake, awake after a failed
            # sleep) unless it says so; the swap's own undo and fallback take it from here
            raise EngineError(str(exc)) from None
        self.last_result = {"op": op, "bytes": result.bytes, "seconds": result.seconds,
                            "steps": {s.step: round(s.seconds, 6) for s in result.steps}}
        log.info("%s: interposer %s: %.2f GiB in %.3f s %s", self.model.name, op, result.bytes / 2**30,
                 result.seconds, self.last_result["steps"])

"""What every engine adapter provides: how to launch it, how to tell it is ready, and optional
sleep/wake hooks for the engine-aware swap path. Adapters hold no process state."""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx

from ..config import ModelConfig


class EngineError(RuntimeError):
    """An engine cannot be launched or driven (bad model path, hook refused, ...)."""


@dataclass
class LaunchSpec:
    """A command line ready to run, and where its OpenAI-compatible API will listen."""

    argv: list[str]
    port: int
    host: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)
    #: runtime=podman: host paths the engine needs, bound read-only at the same place
    mounts: list[str] = field(default_factory=list)
    #: where the engine listens instead of ``port`` when it can: a Unix socket in the service's
    #: owner-only directory (:func:`engine_socket_dir`); ``port`` is then the runtime's gate to it
    #: (runtime/gate.py), which only the service's own user may pass
    unix_socket: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def engine_socket_dir() -> Path:
    """The directory of this user's engine sockets: in ``$XDG_RUNTIME_DIR`` (already owner-only)
    where there is one, else in the temporary directory, named by the user id. The runtime makes
    it (mode 0700) and refuses one that another user made."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime_dir) if runtime_dir and os.path.isdir(runtime_dir) else Path(tempfile.gettempdir())
    return base / f"jupyter-swapserve-engines-{os.geteuid()}"


#: ``python -c UVICORN_ON_SOCKET PATH MODULE ARGS...`` runs ``python -m MODULE ARGS...`` with its
#: ``uvicorn.run`` bound to the Unix socket PATH (uvicorn's own ``uds``; host and port are then
#: unused): for uvicorn-served engines whose command line has no socket option (llama-cpp-python).
#: Code on the command line rather than a module of this package, so it runs in a container's own
#: Python too.
UVICORN_ON_SOCKET = ("import functools, runpy, sys, uvicorn; "
                     "uvicorn.run = functools.partial(uvicorn.run, uds=sys.argv[1]); "
                     "sys.argv = sys.argv[2:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago; the engine binds it right after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EngineAdapter:
    """Base adapter: an OpenAI-compatible server whose readiness is a 200 on ``ready_path``."""

    name: ClassVar[str] = "base"
    #: engines that can drop their KV cache and move weights to host memory on request
    supports_sleep: ClassVar[bool] = False
    #: engines that honour ``stream_options.include_usage`` (a last chunk with ``usage``); for the
    #: others the route counts the streamed tokens itself
    supports_stream_usage: ClassVar[bool] = True

    def __init__(self, model: ModelConfig) -> None:
        self.model = model

    #: the engine version whose command line and routes the adapter follows
    follows: ClassVar[str] = ""

    def launch_spec(self, port: int) -> LaunchSpec:
        raise NotImplementedError

    def private_socket(self, port: int) -> str:
        """The Unix socket an engine launched for ``port`` listens on, for adapters whose engine
        can listen on one (they pass it to the engine and set ``LaunchSpec.unix_socket``): the
        same path inside a container, whose runtime binds the directory there."""
        return str(engine_socket_dir() / f"{port}.sock")

    @property
    def bind_host(self) -> str:
        """Where the engine listens: loopback for a process; inside a container, every interface of
        the container's own network namespace (podman publishes the port on host loopback only)."""
        return "0.0.0.0" if self.model.runtime == "podman" else "127.0.0.1"

    def upstream_model_name(self) -> str:
        """The ``model`` value the engine expects; clients' value is replaced by it."""
        return self.model.served_model_name or self.model.name

    async def is_ready(self, client: httpx.AsyncClient, base_url: str) -> bool:
        try:
            r = await client.get(base_url + self.model.ready_path, timeout=5.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def warmup_request(self) -> tuple[str, dict[str, Any]]:
        """One cheap request that makes the engine do real work before its startup snapshot."""
        if self.model.api == "embedding":
            return "/v1/embeddings", {"model": self.upstream_model_name(), "input": "Hello"}
        if self.model.api == "completion":
            return "/v1/completions", {"model": self.upstream_model_name(), "prompt": "Hello", "max_tokens": 1}
        return "/v1/chat/completions", {
            "model": self.upstream_model_name(),
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 1,
        }

    async def count_tokens(self, client: httpx.AsyncClient, base_url: str, text: str) -> int | None:
        """Tokens of ``text`` by the engine's own tokenizer; None when the engine cannot say."""
        return None

    @property
    def swap_path(self) -> str:
        """How a swap-out moves the engine's GPU memory, in words, for the status."""
        return "sleep hook" if self.supports_sleep else "checkpoint"

    async def sleep(self, client: httpx.AsyncClient, base_url: str) -> None:
        raise EngineError(f"engine '{self.name}' has no sleep hook")

    async def wake(self, client: httpx.AsyncClient, base_url: str) -> None:
        raise EngineError(f"engine '{self.name}' has no wake hook")


class VllmStyleSleepMixin:
    """vLLM's sleep protocol (``POST /sleep?level=N``, ``POST /wake_up``), shared by every engine
    that speaks it (vLLM with --enable-sleep-mode, SGLang's equivalent, the reference engine)."""

    supports_sleep: ClassVar[bool] = True
    model: ModelConfig
    sleep_path: ClassVar[str] = "/sleep"
    wake_path: ClassVar[str] = "/wake_up"

    async def sleep(self, client: httpx.AsyncClient, base_url: str) -> None:
        r = await client.post(
            base_url + self.sleep_path, params={"level": str(self.model.sleep_level)}, timeout=300.0
        )
        if r.status_code >= 300:
            raise EngineError(f"sleep refused: HTTP {r.status_code} {r.text[:200]}")

    async def wake(self, client: httpx.AsyncClient, base_url: str) -> None:
        r = await client.post(base_url + self.wake_path, timeout=300.0)
        if r.status_code >= 300:
            raise EngineError(f"wake_up refused: HTTP {r.status_code} {r.text[:200]}")

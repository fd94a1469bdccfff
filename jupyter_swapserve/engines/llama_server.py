"""llama.cpp's own server binary (``llama-server``), beside llama-cpp-python's Python server."""

from __future__ import annotations

import httpx

from .base import EngineAdapter, LaunchSpec


class LlamaServerAdapter(EngineAdapter):
    name = "llama-server"
    # tools/server/README.md: `llama-server -m FILE --host --port --alias NAME`; GET /health is 503
    # while the model loads and 200 once it can serve; POST /tokenize {"content"} → {"tokens": [...]}
    follows = "llama.cpp b11434 (llama-server -m FILE --alias NAME; /health, /tokenize, include_usage)"
    # tools/server/server-task.cpp sends a usage chunk for stream_options.include_usage (older
    # builds did not: the route then counts the stream, and the prompt through /tokenize)
    supports_stream_usage = True

    def launch_spec(self, port: int) -> LaunchSpec:
        binary = self.model.command if isinstance(self.model.command, str) and self.model.command else "llama-server"
        argv = [binary, "-m", self.model.model or "", "--alias", self.upstream_model_name(),
                "--host", self.bind_host, "--port", str(port), "--parallel", str(self.model.concurrency),
                *self.model.args]
        return LaunchSpec(argv=argv, port=port, env=dict(self.model.env))

    async def is_ready(self, client: httpx.AsyncClient, base_url: str) -> bool:
        # /v1/models answers while the model is still loading; /health only once it can serve
        try:
            r = await client.get(base_url + "/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def count_tokens(self, client: httpx.AsyncClient, base_url: str, text: str) -> int | None:
        try:
            r = await client.post(base_url + "/tokenize", json={"content": text}, timeout=10.0)
            tokens = r.json().get("tokens") if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return len(tokens) if isinstance(tokens, list) else None

"""llama.cpp's own server binary (``llama-server``), beside llama-cpp-python's Python server.

tools/server/README.md (b11434): ``llama-server -m FILE --alias NAME --host --port --parallel N``;
``GET /health`` is 503 while the model loads and 200 once it can serve; ``GET /props`` reports the
model path, the slots (``total_slots``), the build and ``is_sleeping``; ``GET /metrics`` (Prometheus,
``llamacpp:*``) exists with ``--metrics``, which the adapter passes; ``POST /tokenize {"content"}``.

llama.cpp has a sleep of its own, ``--sleep-idle-seconds N``: after N idle seconds the server unloads
the model and its KV cache, and the next request loads it again from the GGUF file (``is_sleeping``
in ``/props``). It is not a sleep hook for the swap service: it cannot be asked for, it frees memory
behind the scheduler's back (the engine's reservation stays held), and its wake is a cold load where
a swap-in restores the loaded engine. So the adapter has no sleep hook, a swap-out checkpoints and
freezes the whole engine, and a models file should leave ``--sleep-idle-seconds`` out (the service's
``idle_timeout`` is the idle swap-out instead).
"""

from __future__ import annotations

import httpx

from .base import EngineAdapter, LaunchSpec


class LlamaServerAdapter(EngineAdapter):
    name = "llama-server"
    follows = "llama.cpp b11434 (llama-server -m FILE --alias NAME --metrics; /health, /props, /metrics, /tokenize)"
    # tools/server/server-task.cpp sends a usage chunk for stream_options.include_usage
    supports_stream_usage = True

    def launch_spec(self, port: int) -> LaunchSpec:
        binary = self.model.command if isinstance(self.model.command, str) and self.model.command else "llama-server"
        argv = [binary, "-m", self.model.model or "", "--alias", self.upstream_model_name(),
                # a --host ending in .sock is a Unix socket (tools/server/server-http.cpp, start())
                "--host", self.private_socket(port), "--port", str(port), "--parallel", str(self.model.concurrency),
                "--metrics", *self.model.args]
        return LaunchSpec(argv=argv, port=port, env=dict(self.model.env), unix_socket=self.private_socket(port))

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

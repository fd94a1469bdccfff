"""SGLang (``python -m sglang.launch_server``) with its memory saver: the engine-aware swap path.

python/sglang/srt/entrypoints/http_server.py (0.5): ``/release_memory_occupation`` and
``/resume_memory_occupation`` (GET or POST) take a JSON body, ``ReleaseMemoryOccupationReqInput``
/ ``ResumeMemoryOccupationReqInput``, whose ``tags`` (``weights``, ``kv_cache``, ``cuda_graph``) are
optional: none means all. They free memory only with ``--enable-memory-saver`` (torch-memory-saver),
which the adapter always passes. A site that sets ``--admin-api-key`` must give the service that
key too: these routes are admin routes then.

Not run here: PyPI has only CUDA builds of SGLang's kernel package and no source to build a CPU one.
"""

from __future__ import annotations

import httpx

from .base import EngineAdapter, EngineError, LaunchSpec


class SglangAdapter(EngineAdapter):
    name = "sglang"
    follows = ("SGLang 0.5 (sglang.launch_server --enable-memory-saver; release_memory_occupation / "
               "resume_memory_occupation with a JSON body; /health)")
    supports_sleep = True

    def launch_spec(self, port: int) -> LaunchSpec:
        argv = ["python3", "-m", "sglang.launch_server", "--model-path", self.model.model or "",
                "--host", self.bind_host, "--port", str(port), "--served-model-name", self.upstream_model_name(),
                "--enable-memory-saver", *self.model.args]
        return LaunchSpec(argv=argv, port=port, env=dict(self.model.env))

    async def _post(self, client: httpx.AsyncClient, base_url: str, path: str, what: str) -> None:
        # a body is required: FastAPI answers a bodyless POST on these routes with a validation error
        # (422, or 400 where SGLang maps validation errors); an empty object means every tag
        r = await client.post(base_url + path, json={}, timeout=300.0)
        if r.status_code >= 300:
            raise EngineError(f"{what} refused: HTTP {r.status_code} {r.text[:200]}")

    async def sleep(self, client: httpx.AsyncClient, base_url: str) -> None:
        await self._post(client, base_url, "/release_memory_occupation", "release_memory_occupation")

    async def wake(self, client: httpx.AsyncClient, base_url: str) -> None:
        await self._post(client, base_url, "/resume_memory_occupation", "resume_memory_occupation")

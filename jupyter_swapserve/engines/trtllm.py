"""TensorRT-LLM's OpenAI-compatible server (``trtllm-serve serve``).

tensorrt_llm/commands/serve.py (1.x): ``trtllm-serve serve MODEL --backend pytorch --host --port``
(``serve`` is also the group's default command); tensorrt_llm/serve/openai_server.py: ``/health``,
``/version``, ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``. It answers to the model
it was given: it has no ``--served-model-name``.

No sleep hook: the server's ``/release_memory`` and ``/resume_memory`` are for reinforcement
learning and work only when the LLM is an ``AsyncLLM`` (the Ray orchestrator); plain ``trtllm-serve``
fails them. So a swap-out checkpoints the whole engine (weights, KV cache, residual).
Not run here: TensorRT-LLM needs an NVIDIA GPU.
"""

from __future__ import annotations

from .base import EngineAdapter, LaunchSpec


class TrtllmAdapter(EngineAdapter):
    name = "trtllm"
    follows = "TensorRT-LLM 1.x (trtllm-serve serve <model> --backend pytorch; /health, /v1/models)"

    def launch_spec(self, port: int) -> LaunchSpec:
        argv = ["trtllm-serve", "serve", self.model.model or "", "--host", self.bind_host, "--port", str(port),
                "--backend", "pytorch", *self.model.args]
        return LaunchSpec(argv=argv, port=port, env=dict(self.model.env))

    def upstream_model_name(self) -> str:
        return self.model.served_model_name or self.model.model or self.model.name

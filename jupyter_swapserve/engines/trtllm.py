"""TensorRT-LLM's OpenAI-compatible server (``trtllm-serve``)."""

from __future__ import annotations

from .base import EngineAdapter, LaunchSpec


class TrtllmAdapter(EngineAdapter):
    name = "trtllm"
    # docs/source/commands/trtllm-serve.rst: `trtllm-serve <model> --backend pytorch --host --port`;
    # /v1/models, /v1/completions, /v1/chat/completions, /health, /version. It has no sleep
    # route, so a swap-out checkpoints the whole engine (weights, KV cache, residual).
    follows = "TensorRT-LLM 1.0 (trtllm-serve <model> --backend pytorch; /health)"

    def launch_spec(self, port: int) -> LaunchSpec:
        argv = ["trtllm-serve", self.model.model or "", "--host", self.bind_host, "--port", str(port),
                "--backend", "pytorch", *self.model.args]
        return LaunchSpec(argv=argv, port=port, env=dict(self.model.env))

    def upstream_model_name(self) -> str:
        # trtllm-serve has no --served-model-name: it answers to the model it was given
        return self.model.served_model_name or self.model.model or self.model.name

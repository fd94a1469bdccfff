"""vLLM (``vllm serve``) with sleep mode, and SGLang, which speak the same sleep protocol."""

from __future__ import annotations

from .base import EngineAdapter, LaunchSpec, VllmStyleSleepMixin


class VllmAdapter(VllmStyleSleepMixin, EngineAdapter):
    name = "vllm"

    def launch_spec(self, port: int) -> LaunchSpec:
        argv = ["vllm", "serve", self.model.model or "", "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", self.upstream_model_name(), "--enable-sleep-mode", *self.model.args]
        # the sleep/wake endpoints are only mounted in dev mode
        env = {"VLLM_SERVER_DEV_MODE": "1", **self.model.env}
        return LaunchSpec(argv=argv, port=port, env=env)


class SglangAdapter(VllmStyleSleepMixin, EngineAdapter):
    name = "sglang"
    sleep_path = "/release_memory_occupation"
    wake_path = "/resume_memory_occupation"

    def launch_spec(self, port: int) -> LaunchSpec:
        argv = ["python", "-m", "sglang.launch_server", "--model-path", self.model.model or "",
                "--host", "127.0.0.1", "--port", str(port), "--served-model-name", self.upstream_model_name(),
                "--enable-memory-saver", *self.model.args]
        return LaunchSpec(argv=argv, port=port, env=dict(self.model.env))

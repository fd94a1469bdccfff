"""Engine adapters, looked up by the ``engine`` field of a model."""

from __future__ import annotations

from ..config import ModelConfig
from .base import EngineAdapter, EngineError, LaunchSpec, free_port
from .command import CommandAdapter
from .llama_server import LlamaServerAdapter
from .llamacpp import LlamaCppAdapter
from .ollama import OllamaAdapter
from .reference import ReferenceAdapter, TransformersAdapter
from .sglang import SglangAdapter
from .trtllm import TrtllmAdapter
from .vllm import VllmAdapter

ADAPTERS: dict[str, type[EngineAdapter]] = {
    cls.name: cls
    for cls in (LlamaCppAdapter, LlamaServerAdapter, CommandAdapter, VllmAdapter, SglangAdapter, OllamaAdapter,
                TrtllmAdapter, ReferenceAdapter, TransformersAdapter)
}


def adapter_for(model: ModelConfig) -> EngineAdapter:
    try:
        cls = ADAPTERS[model.engine]
    except KeyError:
        raise EngineError(
            f"engine '{model.engine}' has no adapter yet (available: {', '.join(sorted(ADAPTERS))})"
        ) from None
    adapter = cls(model)
    if model.swap == "interposer":
        from .interposer import InterposerSleep

        return InterposerSleep(adapter)
    return adapter


__all__ = ["ADAPTERS", "EngineAdapter", "EngineError", "LaunchSpec", "adapter_for", "free_port"]

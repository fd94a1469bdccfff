"""POST /swapserve/v1/embeddings: admitted, queued and swapped in like the completions routes,
for models declared with ``api: embedding``."""

from __future__ import annotations

from typing import Any

from .base import OpenAIError
from .openai import CompletionsHandler, validate_common

ENCODING_FORMATS = ("float", "base64")


def validate_embedding(body: dict[str, Any]) -> None:
    value = body.get("input")
    if value is None:
        raise OpenAIError(400, "'input' is required.", param="input", code="missing_required_parameter")
    ok = (isinstance(value, str) and value != "") or (
        isinstance(value, list) and value and (
            all(isinstance(v, str) and v != "" for v in value)
            or all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or all(isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
                   for v in value)))
    if not ok:
        raise OpenAIError(400, "'input' must be a non-empty string, an array of non-empty strings, or tokens "
                               "(an array of integers, or of arrays of integers).", param="input",
                          code="invalid_type")
    if body.get("stream"):
        raise OpenAIError(400, "Embeddings cannot be streamed.", param="stream", code="invalid_value")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ENCODING_FORMATS:
        raise OpenAIError(400, f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}.",
                          param="encoding_format", code="invalid_value")


class EmbeddingsHandler(CompletionsHandler):
    def initialize(self, upstream_path: str = "/v1/embeddings") -> None:
        super().initialize(upstream_path)

    generates_tokens = False  # a max_tokens default means nothing to an embedding engine

    def validate(self, body: dict[str, Any]) -> str:
        model = validate_common(body)
        validate_embedding(body)
        backend = self.service.backends.get(model)
        if backend is not None and backend.config.api != "embedding":
            raise OpenAIError(400, f"The model '{model}' is not an embedding model (its api is "
                                   f"'{backend.config.api}'); declare one with 'api: embedding'.",
                              param="model", code="model_not_embedding")
        return model

"""Catch-alls for unknown paths under /swapserve/: an OpenAI-shaped 404 JSON, never Jupyter's HTML
page, so an OpenAI client calling a route this service lacks (/v1/audio/..., a typo) is told so.
Registered after every real route."""

from __future__ import annotations

from .base import OpenAIError, SwapServeHandler


class NotFoundHandler(SwapServeHandler):
    def _not_found(self, *args: str) -> None:
        self.require_user("read")
        path = self.request.path
        raise OpenAIError(404, f"Unknown route: {self.request.method} {path}. This service serves "
                               "/swapserve/v1/models, /swapserve/v1/chat/completions, /swapserve/v1/completions, "
                               "/swapserve/v1/embeddings and /swapserve/api/* (see /swapserve/api/openapi.json).",
                          code="unknown_route")

    get = post = put = delete = patch = head = options = _not_found  # type: ignore[assignment]


def fallback_handlers() -> list[tuple]:
    return [(r"/swapserve(/.*)?", NotFoundHandler)]

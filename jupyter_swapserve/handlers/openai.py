"""The OpenAI-compatible routes. Thin: validate, admit through the service, relay."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from tornado.iostream import StreamClosedError

from ..service import EngineUnavailable, ModelNotFound, QueueFull
from ..service.upstream import UpstreamResponse
from .base import OpenAIError, SwapServeHandler


def _check_type(body: dict[str, Any], name: str, types: tuple[type, ...], label: str,
                minimum: float | None = None) -> None:
    if name not in body or body[name] is None:
        return
    value = body[name]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise OpenAIError(400, f"'{name}' must be {label}.", param=name, code="invalid_type")
    if minimum is not None and value < minimum:
        raise OpenAIError(400, f"'{name}' must be at least {minimum:g}.", param=name, code="invalid_value")


def validate_common(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise OpenAIError(400, "'model' is required.", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, "'model' must be a non-empty string.", param="model", code="invalid_type")
    _check_type(body, "stream", (bool,), "a boolean")
    _check_type(body, "max_tokens", (int,), "an integer", minimum=1)
    _check_type(body, "max_completion_tokens", (int,), "an integer", minimum=1)
    _check_type(body, "n", (int,), "an integer", minimum=1)
    _check_type(body, "seed", (int,), "an integer")
    _check_type(body, "temperature", (int, float), "a number", minimum=0)
    _check_type(body, "top_p", (int, float), "a number", minimum=0)
    return model


def validate_chat(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise OpenAIError(400, "'messages' is required.", param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "'messages' must be a non-empty array.", param="messages", code="invalid_type")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise OpenAIError(400, f"'messages[{i}]' must be an object.", param=f"messages[{i}]", code="invalid_type")
        if not isinstance(m.get("role"), str):
            raise OpenAIError(400, f"'messages[{i}].role' is required and must be a string.",
                              param=f"messages[{i}].role", code="invalid_type")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise OpenAIError(400, f"'messages[{i}].content' must be a string or an array.",
                              param=f"messages[{i}].content", code="invalid_type")


def validate_completion(body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise OpenAIError(400, "'prompt' is required.", param="prompt", code="missing_required_parameter")
    ok = isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(p, (str, int)) for p in prompt))
    if not ok:
        raise OpenAIError(400, "'prompt' must be a string or an array of strings.", param="prompt",
                          code="invalid_type")


class ModelsHandler(SwapServeHandler):
    async def get(self) -> None:
        self.require_user("read")
        data = [
            {"id": b.name, "object": "model", "created": int(self.service.started_at), "owned_by": "swapserve",
             "swapserve": {"engine": b.config.engine, "api": b.config.api, "state": b.state.value}}
            for b in self.service.backends.values()
        ]
        self.finish({"object": "list", "data": data})


class CompletionsHandler(SwapServeHandler):
    """POST /swapserve/v1/chat/completions and /swapserve/v1/completions."""

    upstream_path = "/v1/completions"

    def initialize(self, upstream_path: str) -> None:
        self.upstream_path = upstream_path
        self._task: asyncio.Task[Any] | None = None

    def on_connection_close(self) -> None:
        # the client went away: cancel its queue wait or upstream request, freeing its slot
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def post(self) -> None:
        self.require_user("execute")
        body = self.read_json()
        model = validate_common(body)
        if self.upstream_path.endswith("chat/completions"):
            validate_chat(body)
        else:
            validate_completion(body)
        self._task = asyncio.current_task()
        try:
            await self._serve(model, body)
        except asyncio.CancelledError:
            if not self.request.connection.stream or not self.request.connection.stream.closed():
                raise
            # the client disconnected; nothing to answer
        except StreamClosedError:
            pass

    async def _serve(self, model: str, body: dict[str, Any]) -> None:
        try:
            async with self.service.admit(model, self.user_name) as ticket:
                self.set_header("x-swapserve-swap-in-seconds", f"{ticket.swap_in_seconds:.4f}")
                self.set_header("x-swapserve-queue-seconds", f"{ticket.queue_seconds:.4f}")
                async with self.service.forward(ticket, self.upstream_path, body) as upstream:
                    await self._relay(upstream, bool(body.get("stream")))
        except ModelNotFound as exc:
            raise OpenAIError(404, str(exc), param="model", code="model_not_found") from None
        except QueueFull as exc:
            raise OpenAIError(503, str(exc), code="queue_full", retry_after=exc.retry_after) from None
        except EngineUnavailable as exc:
            if self._headers_written:
                # mid-stream: end the stream with an error event, as OpenAI does
                error = {"error": {"message": str(exc), "type": "service_unavailable", "param": None,
                                   "code": "engine_unavailable"}}
                with contextlib.suppress(StreamClosedError):
                    self.write(f"data: {json.dumps(error)}\n\n")
                    self.finish()
                return
            raise OpenAIError(503, str(exc), code="engine_unavailable", retry_after=exc.retry_after) from None

    async def _relay(self, upstream: UpstreamResponse, stream: bool) -> None:
        if upstream.status_code >= 400:
            text = (await upstream.read()).decode("utf-8", "replace")
            message = text[:500]
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                detail = json.loads(text)
                message = detail.get("error", {}).get("message") or detail.get("detail") or message
                message = message if isinstance(message, str) else json.dumps(message)[:500]
            status = upstream.status_code if upstream.status_code < 500 else 503
            raise OpenAIError(status, f"The engine refused the request: {message}", code="upstream_error")
        self.set_status(upstream.status_code)
        self.set_header("Content-Type", upstream.headers.get("content-type", "application/json"))
        if stream:
            self.set_header("Cache-Control", "no-cache")
            self.set_header("X-Accel-Buffering", "no")
            # relay chunk by chunk; tornado buffers unless each chunk is flushed
            async for chunk in upstream.iter_chunks():
                self.write(chunk)
                await self.flush()
            self.finish()
        else:
            self.finish(await upstream.read())

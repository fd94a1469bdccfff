"""The OpenAI-compatible routes. Thin: validate, admit through the service, relay."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from tornado.iostream import StreamClosedError

from ..service import EngineUnavailable, ModelNotFound, QueueFull, Ticket
from ..service.accounting import QuotaExceeded
from ..service.upstream import UpstreamResponse
from ..service.usage import StreamUsage, TokenCount, usage_of_body
from .base import OpenAIError, SwapServeHandler


def _check_type(body: dict[str, Any], name: str, types: tuple[type, ...], label: str,
                minimum: float | None = None, maximum: float | None = None) -> None:
    if name not in body or body[name] is None:
        return
    value = body[name]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise OpenAIError(400, f"'{name}' must be {label}.", param=name, code="invalid_type")
    if minimum is not None and value < minimum:
        raise OpenAIError(400, f"'{name}' must be at least {minimum:g}.", param=name, code="invalid_value")
    if maximum is not None and value > maximum:
        raise OpenAIError(400, f"'{name}' must be at most {maximum:g}.", param=name, code="invalid_value")


def validate_common(body: dict[str, Any]) -> str:
    """Check the fields every OpenAI route shares; returns the model. An optional field given as
    null means "not given" in OpenAI's API: it is removed, since engines differ on it (llama.cpp
    refuses a null temperature with a 500)."""
    for name in [k for k, v in body.items() if v is None and k not in ("model", "messages", "prompt", "input")]:
        del body[name]
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
    _check_type(body, "top_p", (int, float), "a number", minimum=0, maximum=1)  # a probability mass
    _check_type(body, "stream_options", (dict,), "an object")
    if isinstance(body.get("stream_options"), dict):
        _check_type(body["stream_options"], "include_usage", (bool,), "a boolean")
    return model


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_tokens")
    if value is None:
        value = body.get("max_completion_tokens")
    return value if isinstance(value, int) else None


#: the roles of OpenAI's chat messages; an engine given another one refuses it (llama.cpp with a 500)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


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
        if m["role"] not in CHAT_ROLES:
            raise OpenAIError(400, f"'messages[{i}].role' must be one of {', '.join(CHAT_ROLES)}.",
                              param=f"messages[{i}].role", code="invalid_value")
        needed = {"tool": "tool_call_id", "function": "name"}.get(m["role"])
        if needed is not None and not isinstance(m.get(needed), str):
            raise OpenAIError(400, f"'messages[{i}].{needed}' is required for a {m['role']} message.",
                              param=f"messages[{i}].{needed}", code="missing_required_parameter")
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise OpenAIError(400, f"'messages[{i}].content' must be a string or an array.",
                              param=f"messages[{i}].content", code="invalid_type")
        if content is None and not (m["role"] == "assistant" and (m.get("tool_calls") or m.get("function_call"))):
            # only an assistant's message that called tools may come without content (OpenAI's rule); a
            # chat template given a null content fails inside the engine (llama.cpp: a 500)
            raise OpenAIError(400, f"'messages[{i}].content' is required for a {m['role']} message"
                              f"{' without tool_calls' if m['role'] == 'assistant' else ''}.",
                              param=f"messages[{i}].content", code="missing_required_parameter")


def with_system_prompt(body: dict[str, Any], system_prompt: str | None) -> dict[str, Any]:
    """The chat body with the model's configured system message first, when the request has no
    system (or developer) message of its own; otherwise the body as it is."""
    messages = body.get("messages")
    if not system_prompt or not isinstance(messages, list):
        return body
    if any(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages):
        return body
    return {**body, "messages": [{"role": "system", "content": system_prompt}, *messages]}


def with_request_defaults(body: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The body with the model's configured sampling settings where the request sets none."""
    missing = {k: v for k, v in defaults.items() if body.get(k) is None}
    return {**body, **missing} if missing else body


def validate_completion(body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise OpenAIError(400, "'prompt' is required.", param="prompt", code="missing_required_parameter")
    ok = isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(p, (str, int)) for p in prompt))
    if not ok:
        raise OpenAIError(400, "'prompt' must be a string or an array of strings.", param="prompt",
                          code="invalid_type")
    if prompt == "" or (isinstance(prompt, list) and "" in prompt):
        # engines refuse it (llama.cpp with a 500, vLLM with a 400): say so before queueing for a swap
        raise OpenAIError(400, "'prompt' must not be empty.", param="prompt", code="invalid_value")


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

    #: the route generates tokens: the user's max_tokens_per_request becomes a request's default
    generates_tokens = True

    def validate(self, body: dict[str, Any]) -> str:
        """Check the body (400 naming the field); returns the model."""
        model = validate_common(body)
        if self.upstream_path.endswith("chat/completions"):
            validate_chat(body)
        else:
            validate_completion(body)
        return model

    async def post(self) -> None:
        self.require_user("execute")
        body = self.read_json()
        model = self.validate(body)
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
        user = self.identity().name
        try:
            backend = self.service.backend(model)  # an unknown model is a 404 before any quota is counted
            if self.generates_tokens:
                body = with_request_defaults(body, backend.config.request_defaults)
            if self.upstream_path.endswith("chat/completions"):
                body = with_system_prompt(body, backend.config.system_prompt)
            limit = self.service.max_tokens_limit(user, model)
            if limit is not None and self.generates_tokens and requested_max_tokens(body) is None:
                body["max_tokens"] = limit  # the user's per-request limit becomes the request's
            async with self.service.admit(model, user, requested_max_tokens(body)) as ticket:
                self.set_header("x-swapserve-swap-in-seconds", f"{ticket.swap_in_seconds:.4f}")
                self.set_header("x-swapserve-queue-seconds", f"{ticket.queue_seconds:.4f}")
                async with self.service.forward(ticket, self.upstream_path, body) as upstream:
                    await self._relay(upstream, ticket, body)
        except ModelNotFound as exc:
            raise OpenAIError(404, str(exc), param="model", code="model_not_found") from None
        except QuotaExceeded as exc:
            self.service.notifier.notify()  # the user's usage now shows this refusal: panels fetch it again
            r = exc.refusal
            raise OpenAIError(r.status, r.message, param=r.param, code=r.code, retry_after=r.retry_after) from None
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

    async def _relay(self, upstream: UpstreamResponse, ticket: Ticket, body: dict[str, Any]) -> None:
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
        if body.get("stream"):
            await self._relay_stream(upstream, ticket, body)
        else:
            data = await upstream.read()
            count = usage_of_body(data)
            if count is None:
                count = TokenCount(await self.service.count_prompt_tokens(ticket, body), 0)
            ticket.record_tokens(count.prompt_tokens, count.completion_tokens)
            self.finish(data)

    async def _relay_stream(self, upstream: UpstreamResponse, ticket: Ticket, body: dict[str, Any]) -> None:
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        watcher = StreamUsage(client_wants_usage=wants_usage)
        finished = False
        try:
            # relay event by event; tornado buffers unless each chunk is flushed
            async for chunk in upstream.iter_chunks():
                out = watcher.feed(chunk)
                if out:
                    self.write(out)
                    await self.flush()
            prompt = 0 if watcher.reported else await self.service.count_prompt_tokens(ticket, body)
            count = watcher.count(prompt)
            ticket.record_tokens(count.prompt_tokens, count.completion_tokens)
            finished = True
            self.write(watcher.tail(count))
            self.finish()
        finally:
            if not finished:
                # cut off (client gone, engine died): the tokens streamed so far still count
                count = watcher.count(0)
                ticket.record_tokens(count.prompt_tokens, count.completion_tokens)

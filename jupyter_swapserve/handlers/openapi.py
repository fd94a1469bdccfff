"""GET /swapserve/api/openapi.json: an OpenAPI 3.1 description of every route of this extension.

Built in code, beside the routes it describes; tests/test_openapi.py compares it with the
registered handlers (paths and methods) so it cannot fall behind."""

from __future__ import annotations

from typing import Any

from .. import __version__
from .base import SwapServeHandler
from .openai import CHAT_ROLES

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


ERRORS = {
    "400": _error("Invalid request: the error names the field (param)."),
    "401": _error("Missing or invalid credentials."),
    "403": _error("Forbidden: not an admin, or the model is not allowed for the user."),
    "404": _error("Unknown model, user or route."),
    "409": _error("The action is refused in the current state (e.g. a pinned kernel, or over a kernel quota)."),
    "429": _error("A quota is exhausted (Retry-After says when to retry)."),
    "503": _error("The engine is unavailable or its queue is full (Retry-After)."),
}


def _ok(description: str, schema: dict[str, Any] | None = None, content_type: str = JSON) -> dict[str, Any]:
    return {"description": description, "content": {content_type: {"schema": schema or {"type": "object"}}}}


def _op(summary: str, ok: dict[str, Any], errors: tuple[str, ...] = ("401",), body: str | None = None,
        params: list[dict[str, Any]] | None = None, tag: str = "swapserve") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag],
                          "responses": {"200": ok, **{code: ERRORS[code] for code in errors}}}
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref(body)}}}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema or {"type": "string", "minLength": 1}}


POSITIVE_INT = {"type": "integer", "minimum": 1}
NULLABLE_INT = {"type": ["integer", "null"], "minimum": 0}
SAMPLING = {
    "model": {"type": "string", "minLength": 1, "description": "A model of GET /swapserve/v1/models."},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "max_tokens": POSITIVE_INT,
    "max_completion_tokens": POSITIVE_INT,
    "n": POSITIVE_INT,
    "seed": {"type": "integer"},
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
}
QUOTA_FIELDS = {
    "max_concurrent": NULLABLE_INT, "requests_per_minute": NULLABLE_INT, "tokens_per_day": NULLABLE_INT,
    "max_tokens_per_request": NULLABLE_INT, "priority": {"type": ["number", "null"], "exclusiveMinimum": 0},
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
        }},
    },
    "ChatCompletionRequest": {
        "type": "object", "required": ["model", "messages"],
        "properties": {**SAMPLING, "messages": {
            "type": "array", "minItems": 1,
            "items": {"type": "object", "required": ["role"], "properties": {
                "role": {"enum": list(CHAT_ROLES)},
                "content": {"oneOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]}}}}},
    },
    "CompletionRequest": {
        "type": "object", "required": ["model", "prompt"],
        "properties": {**SAMPLING, "prompt": {"oneOf": [
            {"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": ["string", "integer"]}}]}},
    },
    "EmbeddingRequest": {
        "type": "object", "required": ["model", "input"],
        "properties": {
            "model": SAMPLING["model"],
            "input": {"oneOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1,
                                                           "items": {"type": "integer"}}}]},
            "encoding_format": {"enum": ["float", "base64"]},
        },
    },
    "ModelList": {
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object"],
            "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                           "owned_by": {"type": "string"}, "swapserve": {"type": "object"}}}}},
    },
    "QuotaUpdate": {
        "type": "object",
        "properties": {**QUOTA_FIELDS,
                       "allowed_models": {"type": ["array", "null"], "items": {"type": "string"}},
                       "kernel_gpu_gib": {"type": ["number", "null"], "minimum": 0},
                       "kernel_pin_gib": {"type": ["number", "null"], "minimum": 0},
                       "models": {"type": "object", "additionalProperties": {
                           "type": "object", "properties": QUOTA_FIELDS}}},
    },
}

SWAP_RESULT = {"type": "object", "required": ["model", "swapped", "state"],
               "properties": {"model": {"type": "string"}, "swapped": {"type": "boolean"},
                              "seconds": {"type": "number"}, "state": {"type": "string"},
                              "reason": {"type": "string"}}}


def _swap(direction: str) -> dict[str, Any]:
    what = "Swap the model in (evicting others as the policy says)" if direction == "in" else "Swap the model out"
    return {"post": _op(f"{what}; waits until done.", _ok("The model's state after the swap.", SWAP_RESULT),
                        ("401", "403", "404", "503"), tag="admin",
                        params=[_path_param("model", "The model's name.")])}


def _prefetch() -> dict[str, Any]:
    op = _op("Hint that the model will be needed: swapped in ahead when that evicts nothing busy; never waits.",
             _ok("What the hint did (state unchanged, or already running).", PREFETCH_RESULT),
             ("401", "403", "404"), tag="admin", params=[_path_param("model", "The model's name.")])
    op["responses"]["202"] = _ok("The model is being started or swapped in.", PREFETCH_RESULT)
    return op


KERNEL_ACTIONS = {
    "release": "Swap the kernel's GPU memory out as soon as it is idle (what %gpu release asks).",
    "swap-out": "Swap the kernel's GPU memory out now, if it is idle and not pinned.",
    "swap-in": "Restore the kernel's GPU memory now (evicting others as the policy says).",
    "pin": "Keep the kernel on the GPU (within the user's kernel_pin_gib quota).",
    "unpin": "Let the kernel be swapped out again.",
}


def _kernel_action(action: str) -> dict[str, Any]:
    result = {"type": "object", "required": ["kernel_id", "action"],
              "properties": {"kernel_id": {"type": "string"}, "action": {"type": "string"},
                             "result": {"type": "string"}, "state": {"type": "string"},
                             "seconds": {"type": "number"}}}
    return {"post": _op(KERNEL_ACTIONS[action] + " The kernel's user, or an admin.", _ok("What was done.", result),
                        ("401", "403", "404", "409"), tag="kernels",
                        params=[_path_param("kernel_id", "A kernel of this Jupyter server.")])}


PREFETCH_RESULT = {"type": "object", "required": ["model", "prefetch", "state"],
                   "properties": {"model": {"type": "string"}, "prefetch": {"type": "string"},
                                  "state": {"type": "string"}}}


def spec(base_url: str = "/") -> dict[str, Any]:
    """The OpenAPI 3.1 document; ``base_url`` is the Jupyter server's (its /swapserve/ routes below it)."""
    completions = ("400", "401", "403", "404", "429", "503")
    user = _path_param("user", "A user name; '*' (URL-encoded %2A) is the default row.")
    paths: dict[str, Any] = {
        "/swapserve/v1/models": {"get": _op("List the models (OpenAI).", _ok("The models.", _ref("ModelList")),
                                            tag="openai")},
        "/swapserve/v1/chat/completions": {"post": _op(
            "Chat completion (OpenAI); queued, the model swapped in if needed; stream: server-sent events.",
            {"description": "The engine's completion (or a text/event-stream when stream is true).",
             "content": {JSON: {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}},
            completions, body="ChatCompletionRequest", tag="openai")},
        "/swapserve/v1/completions": {"post": _op(
            "Text completion (OpenAI), as chat completions.",
            {"description": "The engine's completion (or a text/event-stream when stream is true).",
             "content": {JSON: {"schema": {"type": "object"}}, "text/event-stream": {"schema": {"type": "string"}}}},
            completions, body="CompletionRequest", tag="openai")},
        "/swapserve/v1/embeddings": {"post": _op(
            "Embeddings (OpenAI) of a model with api: embedding.", _ok("The embeddings."), completions,
            body="EmbeddingRequest", tag="openai")},
        "/swapserve/api/status": {"get": _op("Devices, reservations, models and their states, the caller.",
                                             _ok("The status document."), tag="admin")},
        "/swapserve/api/events": {"get": _op("The status document as server-sent events, on every change.",
                                             _ok("Events.", {"type": "string"}, "text/event-stream"), tag="admin")},
        "/swapserve/api/schema": {"get": _op("The JSON schema of the models file.", _ok("JSON schema."),
                                             tag="admin")},
        "/swapserve/api/models/{model}/swap-in": _swap("in"),
        "/swapserve/api/models/{model}/swap-out": _swap("out"),
        "/swapserve/api/models/{model}/prefetch": {"post": _prefetch()},
        "/swapserve/api/kernels": {"get": _op(
            "The notebook kernels holding GPU memory (GPU tenants): the caller's, or everyone's for admins.",
            _ok("Kernels and the idle timeout."), ("401", "403", "404"), tag="kernels")},
        "/swapserve/api/kernels/{kernel_id}": {"get": _op(
            "One kernel's GPU state (state 'not_a_tenant' when it holds no GPU memory).", _ok("The kernel."),
            ("401", "403", "404"), tag="kernels",
            params=[_path_param("kernel_id", "A kernel of this Jupyter server.")])},
        **{f"/swapserve/api/kernels/{{kernel_id}}/{a}": _kernel_action(a) for a in KERNEL_ACTIONS},
        # the shared service's side of kernels on the shared node (handlers/kernel_reports.py): only a hub
        # user's server calls these, for its own user's kernels; a standalone server answers 404
        "/swapserve/api/kernel-reports": {"post": _op(
            "A user's server reports its kernels that hold GPU memory (a lease: unrenewed, it expires).",
            _ok("The kernels booked and when the lease ends."), ("400", "401", "403", "404"), tag="kernels")},
        "/swapserve/api/kernel-commands": {"get": _op(
            "A user's server's command channel: swap-out and swap-in commands for its kernels.",
            _ok("Events.", {"type": "string"}, "text/event-stream"), ("400", "401", "403", "404"), tag="kernels",
            params=[{"name": "server", "in": "query", "required": False,
                     "schema": {"type": "string", "maxLength": 255}}])},
        "/swapserve/api/kernel-commands/{command_id}": {"post": _op(
            "The server's answer to a command: started, then done or failed.", _ok("The answer taken."),
            ("400", "401", "403", "404"), tag="kernels",
            params=[_path_param("command_id", "A command sent on the server's channel.")])},
        "/swapserve/api/quotas": {"get": _op("Every explicit quota row, the default ('*') first (admins).",
                                             _ok("Quota rows."), ("401", "403", "404"), tag="quotas")},
        "/swapserve/api/quotas/{user}": {
            "get": _op("A user's quota row and effective limits (admins, or the user).", _ok("The row."),
                       ("400", "401", "403", "404"), params=[user], tag="quotas"),
            "put": _op("Set fields of a user's quota (admins); null: no limit.", _ok("The stored row."),
                       ("400", "401", "403", "404", "503"), body="QuotaUpdate", params=[user], tag="quotas"),
            "delete": _op("Remove a user's row: the default applies (admins).", _ok("Whether a row was deleted."),
                          ("400", "401", "403", "404"), params=[user], tag="quotas"),
        },
        "/swapserve/api/usage": {"get": _op(
            "Token and request usage, limits and what remains (admins: everyone).", _ok("Usage."),
            ("400", "401", "403", "404"), tag="quotas",
            params=[{"name": "user", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "days", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 366}}])},
        "/swapserve/api/users": {"get": _op(
            "The user names a quota can be given to (admins): the hub's users on a shared node, asked with the "
            "service's own hub token (names only), or a standalone server's one user.",
            _ok("{users: [names], source: hub|server}."), ("401", "403", "503"), tag="quotas")},
        "/swapserve/api/openapi.json": {"get": _op("This document.", _ok("OpenAPI 3.1."), tag="admin")},
        "/swapserve/metrics": {"get": _op(
            "Prometheus metrics: swaps, evictions, failures, requests, queue wait, TTFT, memory, queues.",
            _ok("Prometheus text format.", {"type": "string"}, "text/plain"), ("401", "404"), tag="admin")},
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "jupyter-swapserve", "version": __version__,
                 "description": "OpenAI-compatible routes that hot-swap LLM engines in and out of GPU memory, "
                                "and the swap service's admin routes. Authenticate with the Jupyter token as "
                                "a bearer token (the OpenAI API key)."},
        "security": [{"jupyterToken": []}],
        "paths": paths,
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"jupyterToken": {"type": "http", "scheme": "bearer"}}},
    }
    if base_url.rstrip("/"):
        document["servers"] = [{"url": base_url.rstrip("/")}]  # paths begin with /swapserve/
    return document


class OpenAPIHandler(SwapServeHandler):
    async def get(self) -> None:
        self.require_user("read")
        self.finish(spec(self.base_url))

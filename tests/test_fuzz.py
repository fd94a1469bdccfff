"""Fuzzing: schemathesis against the OpenAPI spec on a running server (every route, with and
without credentials), and hypothesis on the models-file parser and the request validators.
Nothing may answer 500, hang, or answer an error in any shape but OpenAI's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from jupyter_swapserve.config import ConfigError, load_models_file, parse_models
from jupyter_swapserve.handlers.base import OpenAIError
from jupyter_swapserve.handlers.embeddings import validate_embedding
from jupyter_swapserve.handlers.openai import validate_chat, validate_common, validate_completion
from jupyter_swapserve.handlers.openapi import spec

from .server import ServerHandle, run_server

HERE = Path(__file__).resolve().parent
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)

# ---- models-file parser ---------------------------------------------------------------------------
VALID_MODEL = {"name": "m", "engine": "llamacpp", "model": "x.gguf", "api": "chat", "memory_gib": 0.5}
MODEL_FIELDS = ["name", "engine", "model", "api", "memory_gib", "device", "args", "env", "pinned", "idle_timeout",
                "max_queue", "runtime", "image", "residual", "command", "max_concurrency", "unknown_field"]


def check_parsed(data: Any) -> None:
    try:
        parsed = parse_models(data, "models.yaml")
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("models.yaml: "), message
        return
    for error in parsed.errors:
        assert "\n" not in error and error.startswith("models.yaml: ") and "field '" in error, error


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES)
def test_parser_any_json_is_parsed_or_a_one_line_error(data: Any) -> None:
    check_parsed(data)
    check_parsed({"models": data})
    check_parsed({"models": [data]})
    check_parsed({"devices": data, "models": []})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(MODEL_FIELDS), JSON_VALUES, max_size=4))
def test_parser_a_valid_model_with_fields_changed_is_parsed_or_a_one_line_error(changes: dict[str, Any]) -> None:
    check_parsed({"devices": [{"virtual": True, "memory_gib": 1}], "models": [{**VALID_MODEL, **changes}]})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_models_file_of_any_text_loads_or_is_a_one_line_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    try:
        load_models_file(path)
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)


# ---- request validation ---------------------------------------------------------------------------
REQUEST_FIELDS = ["model", "messages", "prompt", "input", "stream", "stream_options", "max_tokens",
                  "max_completion_tokens", "n", "seed", "temperature", "top_p", "encoding_format"]


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(REQUEST_FIELDS), JSON_VALUES, max_size=6),
       st.sampled_from([validate_chat, validate_completion, validate_embedding]))
def test_request_validation_accepts_or_names_the_field(body: dict[str, Any], validate: Any) -> None:
    try:
        validate_common(body)
        validate(body)
    except OpenAIError as exc:
        assert exc.status_code == 400 and exc.message and exc.code
        assert exc.param is None or exc.param.split("[")[0].split(".")[0] in body or exc.code.startswith(
            "missing"), (exc.param, body)


# ---- schemathesis on a running server ---------------------------------------------------------------
SPEC = spec()
schema = schemathesis.openapi.from_dict(SPEC).exclude(path="/swapserve/api/events")  # endless by design


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerHandle]:
    with run_server(HERE / "models" / "empty.yaml") as server:
        yield server


def content_type(response: Any) -> str:
    for key, value in response.headers.items():
        if key.lower() == "content-type":
            return value[0] if isinstance(value, list) else value
    return ""


def assert_openai_error(response: Any) -> None:
    assert content_type(response).startswith("application/json"), response.text[:200]
    error = json.loads(response.text)["error"]
    assert set(error) == {"message", "type", "param", "code"}


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_schemathesis(case: schemathesis.Case, fuzz_server: ServerHandle) -> None:
    base = fuzz_server.url.rstrip("/")
    response = case.call_and_validate(
        base_url=base, headers=fuzz_server.headers(), timeout=30,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance])
    if response.status_code >= 400:
        assert_openai_error(response)
    if case.method.upper() == "OPTIONS":
        return  # a CORS preflight carries no credentials by definition (jupyter_server answers it)
    for auth in ({}, {"Authorization": "Bearer wrong"}):
        refused = case.call(base_url=base, headers=auth, timeout=30)
        documented = case.method.lower() in SPEC["paths"][case.path]
        # an undocumented method (schemathesis tries TRACE, PATCH...) may be refused as such first
        expected = {401} if documented else {401, 405}
        if refused.status_code == 400 and "Invalid body" in refused.text:
            expected.add(400)  # tornado refuses a body it cannot parse (a bad multipart boundary) first
        assert refused.status_code in expected, (case.method, case.path, refused.text[:200])
        assert_openai_error(refused)


def test_the_event_stream_needs_a_token_too(fuzz_server: ServerHandle) -> None:
    r = httpx.get(fuzz_server.url + "swapserve/api/events", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

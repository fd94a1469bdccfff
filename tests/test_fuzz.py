"""Fuzzing: schemathesis against the OpenAPI spec on a running server with real engines behind the
route (every route, with and without credentials), hypothesis on requests forwarded to those
engines, and hypothesis on the models-file parser and the request validators. Nothing may answer
500, hang, or answer an error in any shape but OpenAI's; after the run nothing may be left behind
(reservations, queued or in-flight requests, engine processes).

The server (tests/models/fuzz.yaml) runs two real llama.cpp models on a virtual device with room
for one: model names in the fuzzed requests are drawn from its models as well as from any string,
so requests are forwarded, queued and swap the engines in and out. What a fuzzed request can cost
is bounded by the product's own limits: the default quota row caps max_tokens (a larger ask is
refused with 400, none gets the cap), and the engines' context is short.

Health checks stay on, except where a comment says why one does not apply. The cost in CI is
bounded by max_examples and the deadlines (about 2-3 minutes on two cores)."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, note, settings
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
from jupyter_swapserve.runtime.procfs import descendants

from .server import ServerHandle, run_server
from .test_status_schema import status_errors

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


# too_slow: drawing nested JSON is slow on a loaded two-core CI machine, and the draw is the point here
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON_VALUES)
def test_parser_any_json_is_parsed_or_a_one_line_error(data: Any) -> None:
    check_parsed(data)
    check_parsed({"models": data})
    check_parsed({"models": [data]})
    check_parsed({"devices": data, "models": []})


# too_slow: as above
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(MODEL_FIELDS), JSON_VALUES, max_size=4))
def test_parser_a_valid_model_with_fields_changed_is_parsed_or_a_one_line_error(changes: dict[str, Any]) -> None:
    check_parsed({"devices": [{"virtual": True, "memory_gib": 1}], "models": [{**VALID_MODEL, **changes}]})


# function_scoped_fixture: every example rewrites the same file in tmp_path; sharing it is the intent
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


# ---- schemathesis on a server with real models ------------------------------------------------------
FUZZ_MODELS = HERE / "models" / "fuzz.yaml"
REAL_MODELS = [m["name"] for m in yaml.safe_load(FUZZ_MODELS.read_text())["models"]]
#: the default quota row's max_tokens_per_request during the run: a fuzzed request costs a few tokens
MAX_TOKENS = 8
SPEC = spec()


def with_real_models(document: dict[str, Any]) -> dict[str, Any]:
    """The spec with every model name (a body's ``model``, the ``{model}`` path parameter) drawn from
    the server's models as well as from any string, so that most requests reach an engine."""
    doc = copy.deepcopy(document)

    def widen(node: Any) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and isinstance(props.get("model"), dict):
                props["model"] = {"anyOf": [{"enum": REAL_MODELS}, props["model"]]}
            if node.get("in") == "path" and node.get("name") == "model":
                node["schema"] = {"anyOf": [{"enum": REAL_MODELS}, node["schema"]]}
            for value in node.values():
                widen(value)
        elif isinstance(node, list):
            for value in node:
                widen(value)

    widen(doc)
    # llama.cpp (the engine here) answers a batch of several prompts with an empty 500, which the route
    # relays as a 503: batches are left out until the adapters say which engines take them
    doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]["oneOf"][1]["maxItems"] = 1
    return doc


schema = schemathesis.openapi.from_dict(with_real_models(SPEC)).exclude(path="/swapserve/api/events")  # endless


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerHandle]:
    with run_server(FUZZ_MODELS) as server:
        server.wait_models()
        r = httpx.put(server.url + "swapserve/api/quotas/%2A", headers=server.headers(), timeout=30,
                      json={"max_tokens_per_request": MAX_TOKENS})
        assert r.status_code == 200, r.text
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
# the deadline bounds one case (a swap-in and a few tokens under CI load take seconds, never a minute)
@settings(max_examples=15, deadline=timedelta(seconds=60))
def test_schemathesis(case: schemathesis.Case, fuzz_server: ServerHandle) -> None:
    base = fuzz_server.url.rstrip("/")
    response = case.call_and_validate(
        base_url=base, headers=fuzz_server.headers(), timeout=60,
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


# ---- hypothesis: requests forwarded to the engines -------------------------------------------------
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                           "content": st.text(max_size=40) | st.none()}),
                    min_size=0, max_size=3)
SAMPLING = st.fixed_dictionaries({}, optional={
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_tokens": st.integers(-2, 12), "temperature": st.floats(-1, 3) | st.none(),
    "top_p": st.floats(0, 1.5), "seed": st.integers(-(2**63), 2**64), "stop": st.text(max_size=3) | st.lists(
        st.text(max_size=3), max_size=2), "n": st.integers(0, 2), "logprobs": st.booleans() | st.integers(0, 3)})


@st.composite
def forwarded_requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    route = draw(st.sampled_from(["/chat/completions", "/completions"]))
    body: dict[str, Any] = {"model": draw(st.sampled_from(REAL_MODELS)), **draw(SAMPLING)}
    if route == "/chat/completions":
        body["messages"] = draw(MESSAGES)
    else:
        # a batch is one prompt at most: see with_real_models
        body["prompt"] = draw(st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=1))
    return route, body


# function_scoped_fixture: the server is module-scoped; the check does not apply to it
@settings(max_examples=25, deadline=timedelta(seconds=60), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(forwarded_requests())
def test_requests_reaching_the_engines_get_an_answer_or_an_openai_error(
        fuzz_server: ServerHandle, request_: tuple[str, dict[str, Any]]) -> None:
    route, body = request_
    note(f"POST {route} {json.dumps(body)}")
    with httpx.stream("POST", fuzz_server.api + route, json=body, headers=fuzz_server.headers(), timeout=60) as r:
        text = r.read().decode()
    note(f"{r.status_code} {r.headers.get('content-type')} {text[:300]}")
    assert r.status_code < 500, (r.status_code, body, text[:300])
    if r.status_code >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", text[-300:]
        for event in events[:-1]:
            chunk = json.loads(event)
            assert "error" in chunk or "choices" in chunk, chunk
    else:
        answer = json.loads(text)
        assert answer["choices"] and answer["model"], answer
        # the quota's cap reached the engine; llama-cpp-python generates past max_tokens while the last
        # token ends inside a UTF-8 character (its multibyte_fix skips the length check): up to 3 more
        assert answer["usage"]["completion_tokens"] <= MAX_TOKENS + 3, answer["usage"]


def test_nothing_is_left_behind_after_the_fuzzing(fuzz_server: ServerHandle) -> None:
    """Runs after the fuzzing (pytest keeps the order of the file): once the last request is over,
    nothing is queued, in flight or waiting for memory; the device's reservations are exactly those of
    the running engines; no engine failed; the engines' processes are the models' own, none orphaned;
    no handler raised."""
    deadline = time.monotonic() + 60
    while True:
        status = fuzz_server.status()
        quiet = all(m["queue_depth"] == 0 and m["in_flight"] == 0 and m["state"] in ("running", "swapped_out")
                    for m in status["models"]) and not status["devices"][0]["waiting"]
        if quiet or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert quiet, status
    assert status_errors(status) == []  # and it still says so in the shape the sidebar reads
    device = status["devices"][0]
    running = [m for m in status["models"] if m["state"] == "running"]
    assert device["reserved_gib"] == pytest.approx(sum(m["reserved_gib"] for m in status["models"]))
    assert device["reserved_gib"] == pytest.approx(sum(m["memory_gib"] for m in running))
    assert device["reserved_gib"] <= device["capacity_gib"]
    assert all(m["error"] is None or "abandoned" in m["error"] for m in status["models"]), status["models"]
    engines = {p for m in status["models"] for p in m["pids"]}
    assert len(engines) == len(REAL_MODELS)
    assert set(descendants(fuzz_server.proc.pid)) - {fuzz_server.proc.pid} == engines
    assert "Traceback" not in fuzz_server.log()


def test_the_event_stream_needs_a_token_too(fuzz_server: ServerHandle) -> None:
    r = httpx.get(fuzz_server.url + "swapserve/api/events", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

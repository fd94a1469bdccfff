"""Fast handler tests in-process with pytest-jupyter (jp_serverapp, jp_fetch): validation,
authentication and error shapes of every route, without engines (a models file with no models)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError, HTTPResponse

from jupyter_swapserve.handlers.openapi import spec

pytest_plugins = ["pytest_jupyter.jupyter_server"]

EMPTY_MODELS = Path(__file__).resolve().parent / "models" / "empty.yaml"


@pytest.fixture
def jp_server_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"jupyter_swapserve": True}},
        "SwapServe": {"models_file": str(EMPTY_MODELS), "quota_db_url": f"sqlite:///{tmp_path}/quotas.sqlite",
                      "event_log": str(tmp_path / "events.jsonl"), "export_env": False},
    }


Api = Callable[..., HTTPResponse]


@pytest.fixture
def api(jp_fetch: Any, jp_asyncio_loop: asyncio.AbstractEventLoop) -> Api:
    """A request to the in-process server, run on its loop (pytest-asyncio's loop is another one);
    the response whatever its status (jp_fetch raises for 4xx/5xx)."""

    async def fetch(path: str, method: str, body: bytes | str | None, headers: dict[str, str]) -> HTTPResponse:
        path, _, query = path.partition("?")
        params = dict(p.split("=", 1) for p in query.split("&")) if query else None
        try:
            return await jp_fetch(*path.strip("/").split("/"), method=method, body=body, headers=headers,
                                  params=params, allow_nonstandard_methods=True)
        except HTTPClientError as exc:
            assert exc.response is not None, exc
            return exc.response

    def call(path: str, method: str = "GET", body: bytes | str | None = None,
             headers: dict[str, str] | None = None) -> HTTPResponse:
        if method in ("POST", "PUT") and body is None:
            body = b"{}"
        return jp_asyncio_loop.run_until_complete(fetch(path, method, body, headers or {}))

    return call


def openai_error(response: HTTPResponse, status: int, code: str | None = None, param: str | None = None
                 ) -> dict[str, Any]:
    assert response.code == status, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    error = json.loads(response.body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


ROUTES = [(path, method.upper()) for path, ops in spec()["paths"].items() for method in ops]


@pytest.mark.parametrize(("path", "method"), ROUTES)
def test_every_route_refuses_a_missing_or_wrong_token(api: Api, path: str, method: str) -> None:
    for auth in ("", "token wrong-token"):
        response = api(concrete(path), method, headers={"Authorization": auth})
        openai_error(response, 401, "invalid_api_key")


@pytest.mark.parametrize("path", ["swapserve/v1/audio/speech", "swapserve/v1/embeddingz", "swapserve/api/nope",
                                  "swapserve/api/models/x/explode", "swapserve", "swapserve/v2/models"])
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
def test_unknown_paths_are_openai_404s_never_html(api: Api, path: str, method: str) -> None:
    error = openai_error(api(path, method), 404, "unknown_route")
    assert path in error["message"]


def test_wrong_method_on_a_known_route_is_a_json_405(api: Api) -> None:
    openai_error(api("swapserve/v1/models", "DELETE"), 405)
    openai_error(api("swapserve/v1/chat/completions", "GET"), 405)


@pytest.mark.parametrize(("route", "body", "code", "param"), [
    ("chat/completions", b"not json", "invalid_json", None),
    ("chat/completions", b"[1, 2]", "invalid_json", None),
    ("chat/completions", b"{}", "missing_required_parameter", "model"),
    ("chat/completions", b'{"model": 3, "messages": []}', "invalid_type", "model"),
    ("chat/completions", b'{"model": "m"}', "missing_required_parameter", "messages"),
    ("chat/completions", b'{"model": "m", "messages": [{"content": "hi"}]}', "invalid_type", "messages[0].role"),
    # an engine refuses a role it does not know (llama.cpp with a 500): the route says so first
    ("chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": ""}]}',
     "invalid_value", "messages[1].role"),
    ("chat/completions", b'{"model": "m", "messages": [{"role": "tool", "content": "42"}]}',
     "missing_required_parameter", "messages[0].tool_call_id"),
    ("completions", b'{"model": "m", "prompt": ""}', "invalid_value", "prompt"),
    ("completions", b'{"model": "m", "prompt": ["a", ""]}', "invalid_value", "prompt"),
    ("completions", b'{"model": "m", "prompt": "a", "top_p": 1.5}', "invalid_value", "top_p"),
    ("chat/completions", b'{"model": "m", "messages": [{"role": "system", "content": null}]}',
     "missing_required_parameter", "messages[0].content"),
    ("chat/completions", b'{"model": "m", "messages": [{"role": "assistant", "content": null}]}',
     "missing_required_parameter", "messages[0].content"),
    ("chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": 0}', "invalid_value",
     "max_tokens"),
    ("chat/completions", b'{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}', "invalid_type",
     "stream"),
    ("completions", b'{"model": "m", "prompt": {"a": 1}}', "invalid_type", "prompt"),
    ("completions", b'{"model": "m", "prompt": "x", "temperature": -1}', "invalid_value", "temperature"),
    ("embeddings", b'{"model": "m"}', "missing_required_parameter", "input"),
    ("embeddings", b'{"model": "m", "input": []}', "invalid_type", "input"),
    ("embeddings", b'{"model": "m", "input": [1, "a"]}', "invalid_type", "input"),
    ("embeddings", b'{"model": "m", "input": "x", "encoding_format": "hex"}', "invalid_value", "encoding_format"),
    ("embeddings", b'{"model": "m", "input": "x", "stream": true}', "invalid_value", "stream"),
])
def test_bad_requests_are_400s_naming_the_field(api: Api, route: str, body: bytes, code: str,
                                                      param: str | None) -> None:
    openai_error(api(f"swapserve/v1/{route}", "POST", body), 400, code, param)


@pytest.mark.parametrize(("route", "body"), [
    ("chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    ("completions", {"model": "nope", "prompt": "hi"}),
    ("embeddings", {"model": "nope", "input": "hi"}),
])
def test_unknown_model_is_404_model_not_found(api: Api, route: str, body: dict[str, Any]) -> None:
    openai_error(api(f"swapserve/v1/{route}", "POST", json.dumps(body)), 404,
                 "model_not_found", "model")


def test_manual_swap_and_prefetch_of_an_unknown_model_are_404(api: Api) -> None:
    for action in ("swap-in", "swap-out", "prefetch"):
        openai_error(api(f"swapserve/api/models/nope/{action}", "POST"), 404, "model_not_found")


def test_usage_days_out_of_range_is_400(api: Api) -> None:
    for days in ("0", "abc", "10000"):
        response = api(f"swapserve/api/usage?days={days}")
        openai_error(response, 400, "invalid_value", "days")


def test_openapi_spec_is_served_for_this_base_url(api: Api, jp_base_url: str) -> None:
    response = api("swapserve/api/openapi.json")
    assert response.code == 200
    served = json.loads(response.body)
    assert served["openapi"] == "3.1.0" and served["paths"] == json.loads(json.dumps(spec()["paths"]))
    assert served["servers"] == [{"url": jp_base_url.rstrip("/")}]


def test_metrics_count_requests_by_route_and_status(api: Api) -> None:
    api("swapserve/v1/completions", "POST", b'{"model": "nope", "prompt": "x"}')
    api("swapserve/v1/models")
    response = api("swapserve/metrics")
    assert response.code == 200 and response.headers["Content-Type"].startswith("text/plain")
    text = response.body.decode()
    assert 'swapserve_requests_total{model="_unknown",route="/v1/completions",status="404"} 1.0' in text
    assert 'swapserve_requests_total{model="",route="ModelsHandler",status="200"} 1.0' in text
    assert 'swapserve_device_capacity_bytes{device="0"}' in text


def test_metrics_also_at_jupyter_servers_own_metrics(api: Api) -> None:
    api("swapserve/v1/models")
    response = api("metrics")
    assert response.code == 200
    text = response.body.decode()
    assert "swapserve_requests_total" in text and "swapserve_device_capacity_bytes" in text
    assert "http_request_duration_seconds" in text  # jupyter_server's own, beside ours
    assert api("metrics", headers={"Authorization": "token wrong"}).code in (401, 403)


class TestClientMode:
    """A user's server in client mode (its shared service unreachable here): forwarded routes say
    the service did not answer, anything else under /swapserve/ is a JSON 404; never HTML."""

    @pytest.fixture
    def jp_server_config(self, tmp_path: Path) -> dict[str, Any]:
        return {"ServerApp": {"jpserver_extensions": {"jupyter_swapserve": True}},
                "SwapServe": {"mode": "client", "upstream_url": "http://127.0.0.1:9/", "export_env": False}}

    def test_unreachable_service_is_503_and_unknown_paths_404(self, api: Api) -> None:
        openai_error(api("swapserve/v1/models"), 503, "upstream_unreachable")
        openai_error(api("swapserve/nope"), 404, "unknown_route")
        openai_error(api("swapserve/metrics"), 404, "unknown_route")
        openai_error(api("swapserve/v1/models", headers={"Authorization": "token wrong"}), 401, "invalid_api_key")


def test_an_optional_field_given_as_null_is_left_out_as_openai_means() -> None:
    from jupyter_swapserve.handlers.openai import validate_common

    body = {"model": "m", "temperature": None, "top_p": None, "stop": None, "max_tokens": 4, "messages": None}
    assert validate_common(body) == "m"
    assert body == {"model": "m", "max_tokens": 4, "messages": None}  # a required one is the route's to refuse

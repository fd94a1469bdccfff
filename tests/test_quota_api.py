"""Quotas and usage end to end on a standalone server: a real Jupyter server, real llama.cpp
engines, the real openai client, a real SQLite database; the admin API and its refusals.
(Two hub users sharing one service: tests/test_hub.py.)"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from openai import OpenAI, PermissionDeniedError, RateLimitError

from .server import ROOT, ServerHandle, run_server

pytestmark = pytest.mark.engines

EMPTY_MODELS = ROOT / "tests" / "models" / "empty.yaml"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerHandle:
    db = tmp_path_factory.mktemp("quota-db") / "quotas.sqlite"
    with run_server(extra_args=[f"--SwapServe.quota_db_url=sqlite:///{db}", "--SwapServe.local_user=alice"]) as s:
        s.wait_models()
        yield s


def api(server: ServerHandle, path: str) -> str:
    return server.url + "swapserve/api/" + path


def put_quota(server: ServerHandle, user: str, body: dict) -> httpx.Response:
    return httpx.put(api(server, f"quotas/{user}"), headers=server.headers(), json=body, timeout=30)


def client(server: ServerHandle) -> OpenAI:
    return OpenAI(base_url=server.api, api_key=server.token, max_retries=0)


@pytest.fixture(autouse=True)
def clean_quotas(server: ServerHandle):
    yield
    for row in httpx.get(api(server, "quotas"), headers=server.headers(), timeout=30).json()["quotas"]:
        httpx.delete(api(server, f"quotas/{quote(row['user'], safe='')}"), headers=server.headers())


def test_every_route_refuses_without_credentials(server: ServerHandle) -> None:
    routes = [("GET", "v1/models"), ("POST", "v1/chat/completions"), ("POST", "v1/completions"),
              ("GET", "api/status"), ("GET", "api/schema"), ("GET", "api/quotas"), ("PUT", "api/quotas/alice"),
              ("DELETE", "api/quotas/alice"), ("GET", "api/quotas/alice"), ("GET", "api/usage"),
              ("POST", "api/models/gemma/swap-in"), ("POST", "api/models/gemma/swap-out")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}):
            r = httpx.request(method, server.url + "swapserve/" + path, headers=headers, json={}, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"


def test_a_wrong_token_is_refused_even_with_a_valid_login_cookie(server: ServerHandle) -> None:
    with httpx.Client(timeout=30) as browser:
        # the token in the URL logs the browser in: it gets the login cookie
        assert browser.get(server.url + f"api/status?token={server.token}").status_code == 200
        assert browser.cookies, "the server set no login cookie"
        assert browser.get(api(server, "status")).status_code == 200  # the cookie alone is valid
        refused = browser.get(api(server, "status"), headers={"Authorization": "Bearer not-the-token"})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"


def test_admin_sets_quotas_and_bad_bodies_name_the_field(server: ServerHandle) -> None:
    r = put_quota(server, "%2A", {"tokens_per_day": 100000, "requests_per_minute": 1000})
    assert r.status_code == 200 and r.json()["user"] == "*" and r.json()["tokens_per_day"] == 100000
    r = put_quota(server, "bob", {"allowed_models": ["smollm2"], "models": {"smollm2": {"priority": 2}}})
    assert r.status_code == 200
    listing = httpx.get(api(server, "quotas"), headers=server.headers(), timeout=30).json()
    assert listing["admin"] is True and [q["user"] for q in listing["quotas"]] == ["*", "bob"]
    assert listing["quotas"][1]["models"] == {"smollm2": {"priority": 2.0}}
    # the form explains every field it renders: a label, a unit, help and what applies when unset
    assert set(listing["field_info"]) == set(listing["fields"])
    for name, info in listing["field_info"].items():
        assert info["label"] and info["unit"] and info["help"] and info["unset"], name
    assert "UTC" in listing["field_info"]["tokens_per_day"]["unit"] and listing["day_starts"] == "00:00 UTC"
    assert listing["models"] == ["gemma", "smollm2"]
    for body, param in [({"tokens_per_dya": 5}, "tokens_per_dya"), ({"max_concurrent": -2}, "max_concurrent"),
                        ({"models": {"gemma": {"colour": 1}}}, "models.gemma.colour"),
                        # a limit on a model the service does not have would be saved and never apply
                        ({"models": {"nosuchmodel": {"tokens_per_day": 5}}}, "models.nosuchmodel"),
                        ({"allowed_models": ["smollm2", "nosuchmodel"]}, "allowed_models")]:
        r = put_quota(server, "bob", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert param in r.json()["error"]["message"]
    assert "gemma, smollm2" in put_quota(server, "bob", {"models": {"nosuchmodel": {}}}).json()["error"]["message"]
    assert httpx.get(api(server, "quotas/bob"), headers=server.headers(), timeout=30).json()["models"] == {
        "smollm2": {"priority": 2.0}}  # nothing of the refused bodies was stored
    r = httpx.put(api(server, "quotas/bob"), headers=server.headers(), content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.delete(api(server, "quotas/bob"), headers=server.headers()).json() == {"user": "bob",
                                                                                      "deleted": True}


def test_the_users_an_admin_can_pick_from(server: ServerHandle) -> None:
    # a standalone server has one user (a shared node's service lists the hub's: tests/browser/test_sidebar_hub.py)
    r = httpx.get(api(server, "users"), headers=server.headers(), timeout=30)
    assert r.status_code == 200 and r.json() == {"users": ["alice"], "source": "server"}
    assert httpx.get(api(server, "users"), timeout=30).status_code == 401


def test_model_not_allowed_and_max_tokens_per_request(server: ServerHandle) -> None:
    put_quota(server, "alice", {"allowed_models": ["gemma"], "max_tokens_per_request": 4})
    with pytest.raises(PermissionDeniedError) as err:
        client(server).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}])
    assert err.value.body["code"] == "model_not_allowed" and "gemma" in err.value.body["message"]
    # "Use now" (the prefetch hint) is refused by the same check, and moves nothing
    r = httpx.post(api(server, "models/smollm2/swap-out"), headers=server.headers(), timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(api(server, "models/smollm2/prefetch"), headers=server.headers(), timeout=30)
    assert r.status_code == 403, r.text
    assert r.json() == {"error": {"message": "Your quota does not include the model 'smollm2' (allowed: gemma).",
                                  "type": "permission_error", "param": "model", "code": "model_not_allowed"}}
    status = httpx.get(api(server, "status"), headers=server.headers(), timeout=30).json()
    assert next(m for m in status["models"] if m["name"] == "smollm2")["state"] == "swapped_out"
    r = httpx.post(api(server, "models/gemma/prefetch"), headers=server.headers(), timeout=30)
    assert r.status_code in (200, 202) and r.json()["model"] == "gemma", r.text
    r = httpx.post(server.api + "/completions", headers=server.headers(), timeout=60,
                   json={"model": "gemma", "prompt": "The capital of France is", "max_tokens": 50})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "4" in r.json()["error"]["message"]
    # no max_tokens in the request: the user's limit becomes the request's
    done = client(server).completions.create(model="gemma", prompt="The capital of France is")
    assert 0 < done.usage.completion_tokens <= 4


def test_rate_limit_answers_429_with_retry_after_and_resets(server: ServerHandle) -> None:
    # every request of the last minute counts, earlier tests' too: allow exactly one more
    usage = httpx.get(api(server, "usage"), headers=server.headers(), timeout=30).json()
    already = usage["used"]["requests_this_minute"]
    put_quota(server, "alice", {"requests_per_minute": already + 1})
    client(server).completions.create(model="gemma", prompt="Hello", max_tokens=2)
    r = httpx.post(server.api + "/completions", headers=server.headers(), timeout=60,
                   json={"model": "gemma", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "per minute" in error["message"] and "resets at" in error["message"]
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    # the user sees the refusal, and when the window frees a request again
    usage = httpx.get(api(server, "usage"), headers=server.headers(), timeout=30).json()
    refusal = usage["last_refusal"]
    assert refusal["code"] == "rate_limit_exceeded" and refusal["model"] == "gemma" and refusal["status"] == 429
    assert refusal["message"] == error["message"] and refusal["retry_at"] > refusal["at"]
    assert usage["remaining"]["requests_this_minute"] == 0 and usage["resets"]["requests"] > usage["now"]
    # the limit lifted, requests flow again (the window itself is covered by tests/test_quotas.py)
    put_quota(server, "alice", {"requests_per_minute": None})
    client(server).completions.create(model="gemma", prompt="Hello", max_tokens=2)


def test_concurrent_streams_are_limited_and_tokens_of_streams_count(server: ServerHandle) -> None:
    put_quota(server, "alice", {"max_concurrent": 1})
    before = httpx.get(api(server, "usage"), headers=server.headers(), timeout=30).json()["used"]["tokens_today"]
    first_chunk = threading.Event()
    chunks: list[dict] = []

    def stream() -> None:
        # llama-cpp-python's server ignores include_usage: the route counts and adds the usage chunk
        for c in client(server).chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Count from one to twenty."}],
                max_tokens=24, stream=True, stream_options={"include_usage": True}):
            chunks.append(c.model_dump())
            first_chunk.set()

    t = threading.Thread(target=stream)
    t.start()
    assert first_chunk.wait(60)
    with pytest.raises(RateLimitError) as err:
        client(server).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                               stream=True)
    assert err.value.body["code"] == "rate_limit_exceeded" and "Concurrent" in err.value.body["message"]
    t.join(60)
    usage = chunks[-1]["usage"]
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert usage["completion_tokens"] == len(content_chunks) > 0 and usage["prompt_tokens"] > 0
    after = httpx.get(api(server, "usage"), headers=server.headers(), timeout=30).json()
    assert after["used"]["tokens_today"] == before + usage["total_tokens"]
    assert after["used"]["concurrent"] == 0  # the finished stream gave its slot back
    # tokens per day: the next request is refused once the day's tokens are spent
    put_quota(server, "alice", {"max_concurrent": None, "tokens_per_day": after["used"]["tokens_today"]})
    with pytest.raises(RateLimitError) as err:
        client(server).completions.create(model="gemma", prompt="Hi", max_tokens=2)
    assert err.value.body["code"] == "insufficient_quota" and "midnight UTC" in err.value.body["message"]


def test_non_admin_cannot_read_or_change_quotas_or_others_usage(tmp_path: Path) -> None:
    EMPTY_MODELS.parent.mkdir(exist_ok=True)
    with run_server(EMPTY_MODELS, extra_args=["--SwapServe.admin_users=['carol']",
                                              "--SwapServe.local_user=dave"]) as s:
        h = s.headers()
        status = httpx.get(api(s, "status"), headers=h, timeout=30).json()
        assert status["user"] == {"name": "dave", "admin": False} and status["mode"] == "standalone"
        for method, path, body in [("GET", "quotas", None), ("PUT", "quotas/dave", {"tokens_per_day": 10**9}),
                                   ("DELETE", "quotas/%2A", None), ("GET", "usage?user=carol", None),
                                   ("GET", "quotas/carol", None), ("GET", "users", None)]:
            r = httpx.request(method, api(s, path), headers=h, timeout=30,
                              content=json.dumps(body).encode() if body else None)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (method, path, r.text)
        own = httpx.get(api(s, "usage"), headers=h, timeout=30).json()
        assert own["user"] == "dave" and own["admin"] is False and own["usage"] == []
        assert httpx.get(api(s, "quotas/dave"), headers=h, timeout=30).status_code == 200
        r = httpx.get(api(s, "usage?days=0"), headers=h, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "days"


def test_quotas_and_usage_survive_a_restart(tmp_path: Path) -> None:
    db = f"--SwapServe.quota_db_url=sqlite:///{tmp_path / 'q.sqlite'}"
    with run_server(extra_args=[db]) as s:
        s.wait_models()
        assert put_quota(s, "%2A", {"tokens_per_day": 123456}).status_code == 200
        client(s).completions.create(model="gemma", prompt="Hello", max_tokens=2)
        used = httpx.get(api(s, "usage"), headers=s.headers(), timeout=30).json()["used"]["tokens_today"]
        assert used > 0
    with run_server(EMPTY_MODELS, extra_args=[db]) as s:
        listing = httpx.get(api(s, "quotas"), headers=s.headers(), timeout=30).json()
        assert listing["quotas"][0]["tokens_per_day"] == 123456
        report = httpx.get(api(s, "usage"), headers=s.headers(), timeout=30).json()
        assert report["used"]["tokens_today"] == used and report["remaining"]["tokens_today"] == 123456 - used

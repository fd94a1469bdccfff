"""The shared node end to end with a real JupyterHub: one swap service (a hub service running the
demo models once) used by two users, each through their own single-user server in client mode,
with the openai client and the %%llm magic in a real kernel; quotas and usage per hub user."""

from __future__ import annotations

import glob
import textwrap
import time
from collections.abc import Iterator

import httpx
import pytest
from jupyter_client import BlockingKernelClient
from openai import OpenAI, RateLimitError

from .hub import Hub, hub_available, run_hub
from .server_kernel import connect

pytestmark = [pytest.mark.engines, pytest.mark.skipif(hub_available() is not None, reason=str(hub_available()))]


@pytest.fixture(scope="module")
def hub() -> Iterator[Hub]:
    with run_hub() as h:
        for name in ("alice", "bob", "teacher"):
            h.add_user(name)
        wait_service_models(h)
        yield h


def wait_service_models(hub: Hub, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(hub.user_url("alice") + "swapserve/api/status", headers=hub.headers("alice"), timeout=30)
        if r.status_code == 200:
            status = r.json()
            states = [m["state"] for m in status["models"]]
            if states and all(s in ("swapped_out", "running") for s in states):
                return status
            assert "failed" not in states, status
        if time.monotonic() > deadline:
            raise TimeoutError(f"shared models not ready: {r.status_code} {r.text[:500]}\n{hub.log()}")
        time.sleep(0.5)


def openai_for(hub: Hub, user: str) -> OpenAI:
    """The plain openai client against the user's own server, with the user's hub token."""
    return OpenAI(base_url=hub.user_url(user) + "swapserve/v1", api_key=hub.tokens[user], max_retries=0)


def status_via(hub: Hub, user: str) -> dict:
    r = httpx.get(hub.user_url(user) + "swapserve/api/status", headers=hub.headers(user), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_both_users_share_one_set_of_engines(hub: Hub) -> None:
    alice, bob = status_via(hub, "alice"), status_via(hub, "bob")
    assert alice["user"] == {"name": "alice", "admin": False} and bob["user"]["name"] == "bob"
    assert [m["name"] for m in alice["models"]] == [m["name"] for m in bob["models"]] == ["gemma", "smollm2"]
    for user in ("alice", "bob"):
        answer = openai_for(hub, user).chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12)
        assert answer.choices[0].message.content
    after = status_via(hub, "bob")
    # the engines started once, in the service: every model has one engine, the same for both users
    for model in after["models"]:
        assert model["swaps_out"] >= 1 and model["last_cold_start_seconds"] is not None
    assert [m["pids"] for m in status_via(hub, "alice")["models"]] == [m["pids"] for m in after["models"]]
    smollm2 = next(m for m in after["models"] if m["name"] == "smollm2")
    assert smollm2["requests"] >= 2 and len(smollm2["pids"]) == 1


def test_usage_is_attributed_to_each_hub_user(hub: Hub) -> None:
    client = openai_for(hub, "bob")
    with client.chat.completions.with_streaming_response.create(
            model="smollm2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, stream=True) as r:
        assert r.headers.get("x-swapserve-swap-in-seconds") is not None  # service headers come through
        chunks = list(r.iter_lines())
    assert any("data:" in c for c in chunks)
    usage = httpx.get(hub.user_url("bob") + "swapserve/api/usage", headers=hub.headers("bob"), timeout=30).json()
    assert usage["user"] == "bob" and usage["admin"] is False
    assert {row["user"] for row in usage["usage"]} == {"bob"} and usage["used"]["tokens_today"] > 0
    # bob may not read alice's usage, nor set quotas
    r = httpx.get(hub.user_url("bob") + "swapserve/api/usage?user=alice", headers=hub.headers("bob"), timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = httpx.put(hub.user_url("bob") + "swapserve/api/quotas/bob", headers=hub.headers("bob"),
                  json={"tokens_per_day": 10**9}, timeout=30)
    assert r.status_code == 403
    # nor push out the model someone else waits for: manual swaps are for admins on a shared node
    r = httpx.post(hub.user_url("bob") + "swapserve/api/models/gemma/swap-out", headers=hub.headers("bob"),
                   timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = httpx.post(hub.user_url("teacher") + "swapserve/api/models/gemma/swap-in", headers=hub.headers("teacher"),
                   timeout=120)
    assert r.status_code == 200 and r.json()["state"] == "running"


def test_admin_quota_applies_to_one_user_only(hub: Hub) -> None:
    teacher = hub.user_url("teacher") + "swapserve/api/"
    status = status_via(hub, "teacher")
    assert status["user"] == {"name": "teacher", "admin": True}  # by the hub role's custom:swapserve:admin
    r = httpx.put(teacher + "quotas/alice", headers=hub.headers("teacher"), json={"tokens_per_day": 0}, timeout=30)
    assert r.status_code == 200, r.text
    try:
        with pytest.raises(RateLimitError) as err:
            openai_for(hub, "alice").completions.create(model="gemma", prompt="Hello", max_tokens=2)
        assert err.value.body["code"] == "insufficient_quota"
        assert int(err.value.response.headers["Retry-After"]) > 0  # Retry-After survives the forwarding
        # alice's quota is hers: bob is unaffected
        assert openai_for(hub, "bob").completions.create(model="gemma", prompt="Hello", max_tokens=2).choices
        everyone = httpx.get(teacher + "usage", headers=hub.headers("teacher"), timeout=30).json()
        assert {"alice", "bob"} <= {row["user"] for row in everyone["usage"]}
    finally:
        httpx.delete(teacher + "quotas/alice", headers=hub.headers("teacher"), timeout=30)
    assert openai_for(hub, "alice").completions.create(model="gemma", prompt="Hello", max_tokens=2).choices


def test_llm_magic_in_a_kernel_of_each_user(hub: Hub) -> None:
    for user in ("alice", "bob"):
        r = httpx.post(hub.user_url(user) + "api/kernels", headers=hub.headers(user), json={"name": "python3"},
                       timeout=60)
        assert r.status_code == 201, r.text
        kernel_id = r.json()["id"]
        try:
            client = kernel_client(hub, user, kernel_id)
            try:
                reply, out = execute(client, "%load_ext jupyter_swapserve", timeout=60)
                assert reply["status"] == "ok", out
                reply, out = execute(client, "%%llm gemma --max-tokens 6 -f text\nThe capital of France is",
                                     timeout=180)
                assert reply["status"] == "ok", out
                assert out.strip(), "the magic printed no answer"
            finally:
                client.stop_channels()
        finally:
            httpx.delete(hub.user_url(user) + f"api/kernels/{kernel_id}", headers=hub.headers(user), timeout=60)
    usage = httpx.get(hub.user_url("teacher") + "swapserve/api/usage", headers=hub.headers("teacher"),
                      timeout=30).json()
    gemma_users = {row["user"] for row in usage["usage"] if row["model"] == "gemma"}
    assert {"alice", "bob"} <= gemma_users  # each kernel's requests were their user's


def test_the_service_refuses_strangers_and_offers_nothing_else(hub: Hub) -> None:
    service = hub.service_url()
    assert httpx.get(service + "swapserve/api/status", timeout=30).status_code in (401, 302, 403)
    r = httpx.get(service + "swapserve/api/status", headers={"Authorization": "token not-a-token"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(service + "swapserve/api/status", headers=hub.headers("alice"), timeout=30).status_code == 200
    # a user who may use the models must not run code as the service's user
    for path in ("api/kernels", "api/contents", "api/terminals", "api/sessions"):
        r = httpx.get(service + path, headers=hub.headers("alice"), timeout=30)
        assert r.status_code in (403, 404), (path, r.status_code, r.text[:200])
    r = httpx.post(service + "api/kernels", headers=hub.headers("alice"), json={"name": "python3"}, timeout=30)
    assert r.status_code in (403, 404)


# ---- driving a kernel of a user's server ---------------------------------------------------------
def kernel_client(hub: Hub, user: str, kernel_id: str) -> BlockingKernelClient:
    """The kernel's client, from its connection file in the user's runtime dir (SimpleLocalProcessSpawner's home),
    alive while the user's server says so (tests/server_kernel.py)."""
    deadline = time.monotonic() + 60
    pattern = str(hub.workdir / "home" / user / "**" / f"kernel-{kernel_id}.json")
    while not (found := glob.glob(pattern, recursive=True, include_hidden=True)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no connection file matching {pattern}")
        time.sleep(0.2)
    return connect(found[0], hub.user_url(user) + f"api/kernels/{kernel_id}", hub.headers(user))


def execute(client: BlockingKernelClient, code: str, timeout: float) -> tuple[dict, str]:
    msg_id = client.execute(textwrap.dedent(code))
    out: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        content = msg["content"]
        if msg["msg_type"] == "stream":
            out.append(content["text"])
        elif msg["msg_type"] in ("display_data", "update_display_data", "execute_result"):
            out.append(content["data"].get("text/plain", ""))
        elif msg["msg_type"] == "error":
            out.append("\n".join(content["traceback"]))
        elif msg["msg_type"] == "status" and content["execution_state"] == "idle":
            break
    while True:
        reply = client.get_shell_msg(timeout=60)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"], "".join(out)


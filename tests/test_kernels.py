"""Notebook kernels as GPU tenants, end to end on a real Jupyter server with a real IPython kernel
on a virtual device (kernels counted by their host memory: bookkeeping only, no CUDA here; the GPU
path is tests/gpu/test_gpu_kernels.py). An execution that reaches a swapped-out kernel through the
kernel websocket is held until the kernel is swapped in, preceded by one status line, and nothing
sent meanwhile is lost or reordered.

What the virtual device cannot prove (docs/testing.md): a kernel's swap here checkpoints nothing
and freezes nothing (the kernel keeps its memory, on the host), so its variables surviving a swap
is no evidence that a swap keeps a kernel's state. That claim is tests/gpu/test_gpu_kernels.py's
(tensors and a CUDA graph's replay bit-identical after a real checkpoint and restore)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from jupyter_client.session import Session
from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1, serialize_msg_to_ws_v1
from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

from .server import ROOT, ServerHandle, run_server
from .test_status_schema import status_errors

MODELS = ROOT / "tests" / "models" / "kernels.yaml"
V1 = "v1.kernel.websocket.jupyter.org"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerHandle]:
    with run_server(MODELS, extra_args=["--SwapServe.kernel_tenants_on_virtual_device=True",
                                        "--SwapServe.kernel_check_interval=0.3"]) as handle:
        handle.wait_models()
        yield handle


def api(server: ServerHandle, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, server.url + path, headers=server.headers(), timeout=60, **kwargs)


def tenant(server: ServerHandle, kernel_id: str) -> dict[str, Any]:
    return api(server, "GET", f"swapserve/api/kernels/{kernel_id}").json()


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture
def kernel(server: ServerHandle) -> Iterator[str]:
    kernel_id = api(server, "POST", "api/kernels", json={"name": "python3"}).json()["id"]
    wait_for(lambda: tenant(server, kernel_id).get("state") == "resident", what="the kernel to become a tenant")
    yield kernel_id
    api(server, "DELETE", f"api/kernels/{kernel_id}")


class KernelSocket:
    """The kernel websocket as JupyterLab uses it: JSON messages, or the v1 binary protocol."""

    def __init__(self, ws: WebSocketClientConnection, protocol: str | None) -> None:
        self.ws, self.protocol = ws, protocol
        self.session = Session(username="test")

    @classmethod
    async def open(cls, server: ServerHandle, kernel_id: str, protocol: str | None) -> KernelSocket:
        url = server.url.replace("http", "ws", 1) + f"api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}"
        request = HTTPRequest(url, headers=server.headers())
        ws = await websocket_connect(request, subprotocols=[protocol] if protocol else None)
        return cls(ws, protocol)

    async def send_execute(self, code: str) -> str:
        msg = self.session.msg("execute_request", content={
            "code": code, "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False,
            "stop_on_error": True})
        if self.protocol == V1:
            await self.ws.write_message(serialize_msg_to_ws_v1(msg, "shell", self.session.pack), binary=True)
        else:
            msg["channel"] = "shell"
            await self.ws.write_message(json.dumps(msg, default=str))
        return str(msg["header"]["msg_id"])

    async def receive(self) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.read_message(), 120)
        assert raw is not None, "the kernel websocket closed"
        if isinstance(raw, bytes):
            channel, parts = deserialize_msg_from_ws_v1(raw)
            header, parent, _meta, content = (json.loads(p) for p in parts[:4])
            return {"channel": channel, "header": header, "parent_header": parent, "content": content,
                    "msg_type": header["msg_type"]}
        msg = json.loads(raw)
        msg["msg_type"] = msg["header"]["msg_type"]
        return msg

    async def outputs_until_idle(self, msg_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        """Every iopub output and the reply of each execution, until each is idle and replied (the
        reply comes on the shell channel, the idle status on iopub: in either order)."""
        got: dict[str, list[dict[str, Any]]] = {m: [] for m in msg_ids}
        idle: set[str] = set()
        replied: set[str] = set()
        while idle != set(msg_ids) or replied != set(msg_ids):
            msg = await self.receive()
            parent = (msg.get("parent_header") or {}).get("msg_id")
            if parent not in got:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle.add(parent)
            elif msg["msg_type"] in ("stream", "execute_reply", "error", "execute_result"):
                got[parent].append(msg)
                if msg["msg_type"] == "execute_reply":
                    replied.add(parent)
        return got

    def close(self) -> None:
        self.ws.close()


def texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"]["text"] for m in messages if m["msg_type"] == "stream"]


@pytest.mark.parametrize("protocol", [V1, None], ids=["v1-binary", "json"])
def test_an_execution_reaching_a_swapped_out_kernel_swaps_it_in_first(server: ServerHandle, kernel: str,
                                                                       protocol: str | None) -> None:
    async def scenario() -> None:
        sock = await KernelSocket.open(server, kernel, protocol)
        try:
            first = await sock.send_execute("secret = 6 * 7\nprint('set')")
            assert texts((await sock.outputs_until_idle([first]))[first]) == ["set\n"]

            before = server.status()["devices"][0]["reserved_gib"]
            out = api(server, "POST", f"swapserve/api/kernels/{kernel}/swap-out").json()
            assert out["state"] == "swapped_out", out
            state = tenant(server, kernel)
            assert state["reserved_gib"] == 0 and state["memory_gib"] > 0
            assert server.status()["devices"][0]["reserved_gib"] < before  # its memory went back to the books

            # two cells sent back to back while swapped out: both run, in order, after one swap-in
            a = await sock.send_execute("print(secret)")
            b = await sock.send_execute("secret += 1\nprint(secret)")
            got = await sock.outputs_until_idle([a, b])
            assert texts(got[a])[0].startswith("GPU state restored in ")
            # held, then run in order; not proof that state survives a swap (nothing moved: see above)
            assert texts(got[a])[1:] == ["42\n"]
            assert texts(got[b]) == ["43\n"]  # no second status line: it was resident by then
            assert [m["content"]["status"] for m in got[a] + got[b] if m["msg_type"] == "execute_reply"] == ["ok", "ok"]
            state = tenant(server, kernel)
            assert state["state"] == "resident" and state["swaps_in"] == 1 and state["reserved_gib"] > 0
            assert status_errors(server.status()) == []  # a live status with a kernel tenant in it
        finally:
            sock.close()

    asyncio.run(scenario())
    # observable like a model's swaps: one metrics label for all kernels, each kernel in the event log
    assert 'model="kernel"' in api(server, "GET", "swapserve/metrics").text
    events = [json.loads(line) for line in (server.root_dir / "events.jsonl").read_text().splitlines()]
    assert any(e.get("model") == f"kernel {kernel}" and e.get("direction") == "in" for e in events), events[-3:]


def test_models_and_kernels_evict_each_other_by_the_same_policy(server: ServerHandle, kernel: str) -> None:
    """The device has room for the model or the kernel: a chat request evicts the idle kernel, and
    the kernel's next cell evicts the idle model; the books never exceed the device."""
    r = api(server, "POST", "swapserve/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    state = tenant(server, kernel)
    assert state["state"] == "swapped_out" and state["last_swap_out_reason"] == "preempted for tiny"

    async def run_cell() -> list[str]:
        sock = await KernelSocket.open(server, kernel, V1)
        try:
            msg_id = await sock.send_execute("print(sum(range(10)))")
            return texts((await sock.outputs_until_idle([msg_id]))[msg_id])
        finally:
            sock.close()

    lines = asyncio.run(run_cell())
    assert lines[0].startswith("GPU state restored in ") and lines[1:] == ["45\n"]
    assert server.model("tiny")["state"] == "swapped_out"
    device = server.status()["devices"][0]
    assert device["reserved_gib"] <= device["capacity_gib"]


def test_idle_kernels_are_swapped_out_and_busy_ones_never(tmp_path: Any) -> None:
    models = tmp_path / "none.yaml"
    models.write_text("devices:\n  - virtual: true\n    memory_gib: 4\nmodels: []\n")
    with run_server(models, extra_args=["--SwapServe.kernel_tenants_on_virtual_device=True",
                                        "--SwapServe.kernel_check_interval=0.2",
                                        "--SwapServe.kernel_idle_timeout=1.0"]) as srv:
        kernel_id = api(srv, "POST", "api/kernels", json={"name": "python3"}).json()["id"]
        wait_for(lambda: tenant(srv, kernel_id).get("state") == "swapped_out", what="the idle swap-out")
        assert tenant(srv, kernel_id)["last_swap_out_reason"] == "idle for 1 s"

        async def long_cell() -> list[str]:
            sock = await KernelSocket.open(srv, kernel_id, V1)
            try:
                msg_id = await sock.send_execute("import time\nfor _ in range(4):\n    time.sleep(1)\nprint('done')")
                states = []
                task = asyncio.ensure_future(sock.outputs_until_idle([msg_id]))
                while not task.done():  # the tenant's state all the time the cell runs (4 s: > the timeout)
                    states.append(await asyncio.to_thread(lambda: tenant(srv, kernel_id)["state"]))
                    await asyncio.sleep(0.05)
                # swapped in for the cell, then resident until it ends: busy, never swapped out meanwhile
                assert "resident" in states, states
                assert set(states[states.index("resident"):]) == {"resident"}, states
                return texts((await task)[msg_id])
            finally:
                sock.close()

        lines = asyncio.run(long_cell())
        assert lines[0].startswith("GPU state restored in ") and lines[-1] == "done\n"
        # idle again: out again after the timeout
        wait_for(lambda: tenant(srv, kernel_id)["swaps_out"] >= 2 and tenant(srv, kernel_id)["state"] == "swapped_out",
                 what="the second idle swap-out")


def test_release_pin_and_the_admins_limits(server: ServerHandle, kernel: str) -> None:
    user = server.status()["user"]["name"]
    try:
        # the admin forbids pinning: a clear refusal naming the limit
        assert api(server, "PUT", f"swapserve/api/quotas/{user}", json={"kernel_pin_gib": 0}).status_code == 200
        r = api(server, "POST", f"swapserve/api/kernels/{kernel}/pin")
        assert r.status_code == 409 and "may pin" in r.json()["error"]["message"]
        assert api(server, "PUT", f"swapserve/api/quotas/{user}", json={"kernel_pin_gib": 10}).status_code == 200
        assert api(server, "POST", f"swapserve/api/kernels/{kernel}/pin").json()["result"].startswith("pinned")
        # pinned: neither a release nor a swap-out moves it
        assert api(server, "POST", f"swapserve/api/kernels/{kernel}/release").status_code == 409
        assert api(server, "POST", f"swapserve/api/kernels/{kernel}/swap-out").json()["state"] == "resident"
        assert api(server, "POST", f"swapserve/api/kernels/{kernel}/unpin").json()["result"] == "unpinned"
        # release: swapped out by the next sweep, since the kernel is idle
        assert "as soon as" in api(server, "POST", f"swapserve/api/kernels/{kernel}/release").json()["result"]
        wait_for(lambda: tenant(server, kernel)["state"] == "swapped_out", what="the release")
        # bad input: an OpenAI error naming the field
        r = api(server, "POST", "swapserve/api/kernels/no-such-kernel/pin")
        assert r.status_code == 404 and r.json()["error"]["param"] == "kernel_id"
        r = api(server, "PUT", f"swapserve/api/quotas/{user}", json={"kernel_gpu_gib": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "kernel_gpu_gib"
    finally:
        api(server, "DELETE", f"swapserve/api/quotas/{user}")


def test_the_gpu_magic_inside_the_kernel(server: ServerHandle, kernel: str) -> None:
    async def cells() -> list[list[str]]:
        sock = await KernelSocket.open(server, kernel, V1)
        try:
            results = []
            # release last: a cell after it would (rightly) bring the kernel back if the sweep came between
            for code in ("%load_ext jupyter_swapserve\n%gpu", "%gpu bogus", "%gpu release"):
                msg_id = await sock.send_execute(code)
                got = (await sock.outputs_until_idle([msg_id]))[msg_id]
                results.append(texts(got) + [m["content"].get("evalue", "") for m in got if m["msg_type"] == "error"])
            return results
        finally:
            sock.close()

    shown, bogus, released = asyncio.run(cells())
    assert shown[0].startswith("GPU: ") and "resident" in shown[0]
    assert released == ["GPU: will be swapped out as soon as the cell finishes\n"]
    assert any("unknown action 'bogus'" in line for line in bogus)
    wait_for(lambda: tenant(server, kernel)["state"] == "swapped_out", what="the release after the cell")


def test_a_kernel_restarted_while_swapped_out_starts_afresh(server: ServerHandle, kernel: str) -> None:
    """The checkpointed state died with the old process: the restarted kernel is a new tenant, and
    its next cell runs without a restore (and without an error line)."""
    old_pid = tenant(server, kernel)["pids"][0]
    assert api(server, "POST", f"swapserve/api/kernels/{kernel}/swap-out").json()["state"] == "swapped_out"
    assert api(server, "POST", f"api/kernels/{kernel}/restart").status_code == 200
    fresh = wait_for(lambda: (t := tenant(server, kernel)).get("state") == "resident" and t["pids"][0] != old_pid
                     and t, what="the restarted kernel as a new tenant")
    assert fresh["swaps_out"] == 0

    async def run_cell() -> list[str]:
        sock = await KernelSocket.open(server, kernel, V1)
        try:
            msg_id = await sock.send_execute("print('fresh')")
            return texts((await sock.outputs_until_idle([msg_id]))[msg_id])
        finally:
            sock.close()

    assert asyncio.run(run_cell()) == ["fresh\n"]

"""The %%llm magic in a real IPython kernel started by the real Jupyter server (so it inherits
SWAPSERVE_URL/SWAPSERVE_TOKEN as in real use), against the real demo models.

The kernel is started through the server's REST API; the test talks to it over ZMQ with
jupyter_client, through the connection file the server writes in the Jupyter runtime directory.
"""

from __future__ import annotations

import json
import queue
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from jupyter_core.paths import jupyter_runtime_dir

from jupyter_swapserve.kernel.client import ServerError, seconds, wait_line
from jupyter_swapserve.kernel.magics import interpolate, strip_fences

from .server import ServerHandle, free_port, run_server
from .server_kernel import connect

pytestmark = pytest.mark.engines


@dataclass
class Run:
    """One execution: its iopub messages in order, and its execute_reply."""

    reply: dict[str, Any]
    msgs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reply["status"] == "ok"

    @property
    def stdout(self) -> str:
        return "".join(m["content"]["text"] for m in self.msgs
                       if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(m["content"]["text"] for m in self.msgs
                       if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")

    @property
    def error(self) -> dict[str, Any] | None:
        return next((m["content"] for m in self.msgs if m["msg_type"] == "error"), None)

    def displays(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(msg_type, display_id, data) of display_data and update_display_data, in order."""
        return [(m["msg_type"], m["content"].get("transient", {}).get("display_id", ""), m["content"]["data"])
                for m in self.msgs if m["msg_type"] in ("display_data", "update_display_data")]

    def final(self, display_id: str) -> dict[str, Any]:
        return [d for _, i, d in self.displays() if i == display_id][-1]

    def answer_id(self) -> str:
        """The display that carries the answer: the one that is not the quiet status line."""
        return next(i for _, i, d in self.displays() if i and "text/html" not in d and d.get("text/plain"))

    def status_lines(self) -> list[str]:
        return [d["text/plain"] for _, _, d in self.displays() if "text/html" in d]

    def plain(self) -> str:
        return "\n".join(d.get("text/plain", "") for _, _, d in self.displays())


class ServerKernel:
    """A python3 kernel started by the Jupyter server through POST /api/kernels."""

    def __init__(self, server: ServerHandle) -> None:
        self.server = server
        r = httpx.post(server.url + "api/kernels", headers=server.headers(), json={"name": "python3"}, timeout=60)
        r.raise_for_status()
        self.id: str = r.json()["id"]
        path = Path(jupyter_runtime_dir()) / f"kernel-{self.id}.json"
        deadline = time.monotonic() + 60
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no connection file {path}")
            time.sleep(0.1)
        self.client = connect(str(path), f"{server.url}api/kernels/{self.id}", server.headers())

    def execute(self, code: str) -> str:
        return self.client.execute(textwrap.dedent(code).strip("\n"), store_history=True)

    def collect(self, msg_id: str, timeout: float = 240, until: Any = None) -> Run:
        """The iopub messages of msg_id until the kernel is idle again (or until(msg) is true)."""
        run = Run(reply={})
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                seen = [m["msg_type"] for m in run.msgs]
                last = run.msgs[-1]["content"] if run.msgs else None
                raise TimeoutError(f"no idle after {timeout} s; messages: {seen[:20]}…; last: {str(last)[:500]}") \
                    from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            run.msgs.append(msg)
            if until is not None and until(msg):
                return run
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        while True:
            reply = self.client.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                run.reply = reply["content"]
                return run

    def run(self, code: str, timeout: float = 240) -> Run:
        return self.collect(self.execute(code), timeout)

    def interrupt(self) -> None:
        r = httpx.post(f"{self.server.url}api/kernels/{self.id}/interrupt", headers=self.server.headers(),
                       timeout=30)
        r.raise_for_status()

    def shutdown(self) -> None:
        self.client.stop_channels()
        httpx.delete(f"{self.server.url}api/kernels/{self.id}", headers=self.server.headers(), timeout=60)


def start_kernel(server: ServerHandle) -> ServerKernel:
    k = ServerKernel(server)
    run = k.run("%load_ext jupyter_swapserve")
    assert run.ok, run.msgs
    return k


@pytest.fixture(scope="module")
def kernel(demo_server: ServerHandle) -> Iterator[ServerKernel]:
    k = start_kernel(demo_server)
    yield k
    k.shutdown()


@pytest.fixture
def fresh_kernel(demo_server: ServerHandle) -> Iterator[ServerKernel]:
    """For tests that change the kernel's environment."""
    k = start_kernel(demo_server)
    yield k
    k.shutdown()


def one_line_error(run: Run) -> str:
    """The failure as the user sees it: exactly one line, no traceback."""
    assert not run.ok
    err = run.error
    assert err is not None, run.msgs
    assert len(err["traceback"]) == 1, err["traceback"]
    line = err["traceback"][0]
    assert "\n" not in line.strip() and "Traceback" not in line
    return line


# ---- finding the server --------------------------------------------------------------------------

def test_kernel_finds_the_server_from_its_environment(kernel: ServerKernel, demo_server: ServerHandle) -> None:
    run = kernel.run("%llm config")
    assert run.ok, run.msgs
    assert demo_server.api in run.stdout and "from SWAPSERVE_URL" in run.stdout


def test_falls_back_to_the_runtime_dir_server_that_started_the_kernel(
        fresh_kernel: ServerKernel, demo_server: ServerHandle) -> None:
    run = fresh_kernel.run("""
        import os
        os.environ.pop("SWAPSERVE_URL"); os.environ.pop("SWAPSERVE_TOKEN")
        %llm config
    """)
    assert run.ok, run.msgs
    # other Jupyter servers may be running too: the kernel's parent comes first
    assert f"Jupyter runtime dir, server pid {demo_server.proc.pid}" in run.stdout
    assert demo_server.api in run.stdout


def test_falls_back_to_the_jupyterhub_environment(fresh_kernel: ServerKernel, demo_server: ServerHandle) -> None:
    empty_runtime = tempfile.mkdtemp(prefix="swapserve-runtime-")
    # a single-user server listening on all interfaces, as JupyterHub reports it
    service_url = demo_server.url.replace("127.0.0.1", "0.0.0.0")
    run = fresh_kernel.run(f"""
        import os
        os.environ.pop("SWAPSERVE_URL"); os.environ.pop("SWAPSERVE_TOKEN")
        os.environ["JUPYTER_RUNTIME_DIR"] = {empty_runtime!r}
        os.environ["JUPYTERHUB_API_TOKEN"] = {demo_server.token!r}
        os.environ["JUPYTERHUB_SERVICE_URL"] = {service_url!r}
        %llm list
        %llm config
    """)
    assert run.ok, run.msgs
    assert "from JupyterHub environment" in run.stdout and demo_server.api in run.stdout
    assert "gemma" in run.plain()


def test_unreachable_server_is_one_line_naming_what_was_tried(fresh_kernel: ServerKernel) -> None:
    empty_runtime = tempfile.mkdtemp(prefix="swapserve-runtime-")
    dead = f"http://127.0.0.1:{free_port()}/swapserve/v1"
    run = fresh_kernel.run(f"""
        import os
        os.environ["SWAPSERVE_URL"] = {dead!r}
        os.environ["JUPYTER_RUNTIME_DIR"] = {empty_runtime!r}
        os.environ.pop("JUPYTERHUB_API_TOKEN", None)
        %llm list
    """)
    line = one_line_error(run)
    assert "No jupyter-swapserve server found" in line
    assert "SWAPSERVE_URL" in line and "connection refused" in line
    assert "runtime dir" in line and "JupyterHub" in line and "%llm config --url" in line

    run = fresh_kernel.run(f"%llm config --url {dead} --token nope")
    line = one_line_error(run)
    assert "%llm config" in line and "connection refused" in line


def test_config_sets_the_server_explicitly(fresh_kernel: ServerKernel, demo_server: ServerHandle) -> None:
    run = fresh_kernel.run(f"""
        import os
        os.environ["SWAPSERVE_URL"] = "http://127.0.0.1:{free_port()}/swapserve/v1"
        %llm config --url {demo_server.url} --token {demo_server.token}
        %llm list
    """)
    assert run.ok, run.msgs
    assert "from %llm config" in run.stdout and "smollm2" in run.plain()

    run = fresh_kernel.run("%llm config --url http://127.0.0.1:1 --token wrong")
    assert "connection refused" in one_line_error(run)


# ---- line magics ---------------------------------------------------------------------------------

def test_list_shows_both_models(kernel: ServerKernel) -> None:
    run = kernel.run("%llm list")
    assert run.ok, run.msgs
    table = run.plain()
    lines = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert set(lines) == {"gemma", "smollm2"}
    assert "completion" in lines["gemma"] and "chat" in lines["smollm2"]
    assert "GiB" in lines["gemma"]
    assert "| gemma |" in run.displays()[0][2]["text/markdown"]


def test_status_shows_devices_and_models(kernel: ServerKernel) -> None:
    run = kernel.run("%llm status")
    assert run.ok, run.msgs
    assert "virtual" in run.plain() and "gemma" in run.plain() and "swaps in/out" in run.plain()


def test_swap_out_and_in_by_line_magic(kernel: ServerKernel, demo_server: ServerHandle) -> None:
    run = kernel.run("%llm swap-in smollm2")
    assert run.ok, run.msgs
    assert demo_server.model("smollm2")["state"] == "running"
    assert "smollm2 swapped in" in run.stdout or "already in memory" in run.stdout
    run = kernel.run("%llm swap-out smollm2")
    assert run.ok, run.msgs
    assert "smollm2 swapped out" in run.stdout
    assert demo_server.model("smollm2")["state"] == "swapped_out"


# ---- %%llm ---------------------------------------------------------------------------------------

def test_markdown_answer_streams_in_several_messages(kernel: ServerKernel) -> None:
    run = kernel.run("""
        %%llm smollm2 --max-tokens 48 --temperature 0
        Write a short poem about the sea.
    """)
    assert run.ok, run.msgs
    answer = run.answer_id()
    shown = [d for _, i, d in run.displays() if i == answer]
    final = shown[-1]
    assert final["text/markdown"] == final["text/plain"] and final["text/plain"].strip()
    # the answer appears piece by piece: several distinct, growing texts before the final one
    texts = [d["text/plain"] for d in shown]
    distinct = sorted(set(texts), key=len)
    assert len(distinct) >= 3, texts
    assert all(final["text/plain"].startswith(t) for t in texts)


def test_text_format_and_output_variable(kernel: ServerKernel) -> None:
    run = kernel.run("""
        %%llm gemma -f text --max-tokens 8 --temperature 0 -o answer
        The capital of France is
    """)
    assert run.ok, run.msgs
    final = run.final(run.answer_id())
    assert "text/markdown" not in final and final["text/plain"].strip()
    run = kernel.run("print(repr(answer))")
    assert run.stdout.strip() == repr(final["text/plain"])


def test_code_format_puts_the_code_in_a_new_cell(kernel: ServerKernel) -> None:
    run = kernel.run("""
        %%llm smollm2 -f code --max-tokens 64 --temperature 0 -o code
        Write a Python function add(a, b) that returns the sum of a and b.
    """)
    assert run.ok, run.msgs
    payload = [p for p in run.reply.get("payload", []) if p.get("source") == "set_next_input"]
    assert len(payload) == 1 and payload[0]["replace"] is False
    code = payload[0]["text"]
    assert code.strip() and "```" not in code
    assert run.final(run.answer_id())["text/markdown"].startswith("```")
    assert kernel.run(f"print(code == {code!r})").stdout.strip() == "True"


def test_variables_are_interpolated(kernel: ServerKernel) -> None:
    run = kernel.run("""
        topic = "the moon"
        items = ["tea", "cake"]
        %llm reset smollm2
    """)
    assert run.ok, run.msgs
    run = kernel.run("""
        %%llm smollm2 --chat --max-tokens 8 --temperature 0
        One word about {topic} and {items[1]!r}; not {{topic}} or {undefined} or {"a": 1}.
    """)
    assert run.ok, run.msgs
    run = kernel.run("""
        m = get_ipython().magics_manager.registry["LLMMagics"]
        print(m.conversations["smollm2"][0]["content"])
    """)
    assert run.stdout.strip() == """One word about the moon and 'cake'; not {topic} or {undefined} or {"a": 1}."""


def test_chat_remembers_the_previous_turn(kernel: ServerKernel) -> None:
    assert kernel.run("%llm reset").ok
    run = kernel.run("""
        %%llm smollm2 --chat --max-tokens 24 --temperature 0 --seed 1
        Hi, I am Ada Lovelace.
    """)
    assert run.ok, run.msgs
    first = run.final(run.answer_id())["text/plain"]
    run = kernel.run("""
        %%llm smollm2 --chat --max-tokens 24 --temperature 0 --seed 1 -o second
        Who am I?
    """)
    assert run.ok, run.msgs
    run = kernel.run("""
        m = get_ipython().magics_manager.registry["LLMMagics"]
        import json; print(json.dumps(m.conversations["smollm2"]))
        print(repr(second))
    """)
    conv_line, second = run.stdout.strip().splitlines()
    conv = json.loads(conv_line)
    assert [t["role"] for t in conv] == ["user", "assistant", "user", "assistant"]
    assert conv[0]["content"] == "Hi, I am Ada Lovelace." and conv[1]["content"] == first
    # the second request carried the first turn: the model can only know the name from it, and asked
    # the same question without it (greedy, same seed) it does not name her
    assert "Ada" in second or "Lovelace" in second
    run = kernel.run("""
        %%llm smollm2 --max-tokens 24 --temperature 0 --seed 1 -o alone
        Who am I?
    """)
    assert run.ok, run.msgs
    alone = kernel.run("print(alone)").stdout
    assert alone.strip() and "Ada" not in alone and "Lovelace" not in alone

    # without --chat nothing is remembered, and reset forgets
    assert kernel.run("%%llm smollm2 --max-tokens 4\nHi").ok
    assert len(json.loads(kernel.run("print(json.dumps(m.conversations['smollm2']))").stdout)) == 4
    run = kernel.run("%llm reset smollm2\nprint(m.conversations.get('smollm2'))")
    assert run.stdout.splitlines()[-1] == "None"


def test_request_for_a_swapped_out_model_reports_its_swap(kernel: ServerKernel, demo_server: ServerHandle) -> None:
    assert kernel.run("%llm swap-out gemma").ok
    assert demo_server.model("gemma")["state"] == "swapped_out"
    run = kernel.run("""
        %%llm gemma -f text --max-tokens 4
        Once upon a time
    """)
    assert run.ok, run.msgs
    lines = run.status_lines()
    assert any(line.startswith("gemma swapped in, ") for line in lines), lines
    # the line stays, quietly, above the answer
    assert run.status_lines()[-1].startswith("gemma swapped in")
    order = list(dict.fromkeys(i for _, i, _ in run.displays()))
    assert order.index(run.answer_id()) == len(order) - 1

    # the model is in memory now: no swap line this time
    run = kernel.run("%%llm gemma -f text --max-tokens 4\nOnce upon a time")
    assert run.ok and not any("swapped in" in line for line in run.status_lines())


def test_interrupt_cancels_the_request_on_the_server(kernel: ServerKernel, demo_server: ServerHandle) -> None:
    msg_id = kernel.execute("""
        %%llm gemma -f text --max-tokens 1500 --temperature 0
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
    """)
    # wait until the answer is streaming, then interrupt the kernel the way a front end does
    first = kernel.collect(msg_id, until=lambda m: m["msg_type"] == "update_display_data")
    assert demo_server.model("gemma")["in_flight"] == 1
    kernel.interrupt()
    run = kernel.collect(msg_id)
    run.msgs[:0] = first.msgs
    line = one_line_error(run)
    assert "Interrupted" in line and "gemma" in line
    # the server saw the disconnect and ended the request, long before 1500 tokens
    deadline = time.monotonic() + 10
    while demo_server.model("gemma")["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert demo_server.model("gemma")["in_flight"] == 0
    # and the kernel carries on
    assert kernel.run("%%llm gemma -f text --max-tokens 2\nHello").ok


@pytest.fixture
def own_server() -> Iterator[ServerHandle]:
    """A server of its own, for a test that leaves the swap machinery mid-eviction on purpose."""
    with run_server() as server:
        server.wait_models()
        yield server


def test_waiting_line_and_interrupt_while_waiting(own_server: ServerHandle) -> None:
    demo_server = own_server
    kernel = start_kernel(own_server)
    # another client keeps gemma answering, so smollm2 has to wait for device memory
    assert kernel.run("%llm swap-in gemma").ok
    release = threading.Event()

    def busy() -> None:
        body = {"model": "gemma", "prompt": "1, 2, 3, 4,", "max_tokens": 1500, "stream": True}
        with httpx.stream("POST", demo_server.api + "/completions", headers=demo_server.headers(), json=body,
                          timeout=120) as r:
            for _ in r.iter_lines():
                if release.is_set():
                    return

    other = threading.Thread(target=busy)
    other.start()
    try:
        deadline = time.monotonic() + 60
        while demo_server.model("gemma")["in_flight"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        msg_id = kernel.execute("%%llm smollm2 --max-tokens 8\nHello")

        def says_waiting(m: dict[str, Any]) -> bool:
            text = m["content"].get("data", {}).get("text/plain", "") if "data" in m["content"] else ""
            return m["msg_type"] in ("display_data", "update_display_data") and "waiting for memory" in text

        first = kernel.collect(msg_id, until=says_waiting)
        line = first.displays()[-1][2]["text/plain"]
        assert line.startswith("smollm2 is waiting for memory: gemma is answering"), line
        kernel.interrupt()
        run = kernel.collect(msg_id)
    finally:
        release.set()
        other.join()
    assert "Interrupted" in one_line_error(run)
    # the waiting line does not outlive the request
    status_id = first.displays()[-1][1]
    assert [d for _, i, d in run.displays() if i == status_id][-1]["text/plain"] == ""
    # the server dropped the queued request: no queue, no reservation waiting
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status = demo_server.status()
        smollm2 = next(m for m in status["models"] if m["name"] == "smollm2")
        if smollm2["queue_depth"] == 0 and not status["devices"][0]["waiting"]:
            break
        time.sleep(0.1)
    assert smollm2["queue_depth"] == 0 and smollm2["in_flight"] == 0
    assert status["devices"][0]["waiting"] == []
    # and both models serve again: the eviction the cancelled request started did not wedge gemma
    for cell in ("%%llm smollm2 --max-tokens 2\nHi", "%%llm gemma -f text --max-tokens 2\nHi"):
        msg_id = kernel.execute(cell)
        try:
            run = kernel.collect(msg_id, timeout=90)
        except TimeoutError:
            states = [(m["name"], m["state"], m["reserved_gib"]) for m in demo_server.status()["models"]]
            pytest.fail(f"no answer after the cancelled wait; (model, state, reserved GiB): {states}")
        assert run.ok, run.msgs
    kernel.shutdown()


# ---- expected failures: one line each -------------------------------------------------------------

def test_unknown_model_lists_the_models(kernel: ServerKernel) -> None:
    line = one_line_error(kernel.run("%%llm nosuch\nHello"))
    assert "nosuch" in line and "Available models: gemma, smollm2" in line
    line = one_line_error(kernel.run("%llm swap-in nosuch"))
    assert "Available models: gemma, smollm2" in line


def test_bad_options_are_usage_errors(kernel: ServerKernel) -> None:
    for cell in ("%%llm smollm2 -f pdf\nHello", "%%llm smollm2 --max-tokens many\nHello", "%%llm smollm2\n  ",
                 "%llm frobnicate"):
        run = kernel.run(cell)
        assert not run.ok
        assert "UsageError" in run.stderr and "Traceback" not in run.stderr + run.stdout, run.msgs


def test_engine_failure_reports_its_status_message(tmp_path: Path) -> None:
    models = tmp_path / "broken.yaml"
    models.write_text(textwrap.dedent("""
        devices: [{virtual: true, memory_gib: 1.0}]
        models:
          - {name: broken, engine: llamacpp, model: /nonexistent/model.gguf, memory_gib: 0.2}
    """))
    with run_server(models) as server:
        server.wait_models(states=("failed", "swapped_out", "running"))
        reason = server.model("broken")["error"]
        assert reason
        k = start_kernel(server)
        try:
            line = one_line_error(k.run("%%llm broken\nHello"))
            assert "broken" in line and "/nonexistent/model.gguf" in line
        finally:
            k.shutdown()


# ---- pure helpers --------------------------------------------------------------------------------

def test_interpolate() -> None:
    ns = {"name": "Ada", "xs": [1, 2], "d": {"k": "v"}, "pi": 3.14159}
    assert interpolate("Hi {name}, {xs[1]}, {d[k]}, {pi:.2f}, {name!r}", ns) == "Hi Ada, 2, v, 3.14, 'Ada'"
    assert interpolate("{{name}} {missing} {name.nope} def f(): return {1: 2}", ns) == \
        "{name} {missing} {name.nope} def f(): return {1: 2}"


def test_strip_fences() -> None:
    assert strip_fences("Here:\n```python\nx = 1\n```\nDone") == ("x = 1", "python")
    assert strip_fences("x = 1\n") == ("x = 1", None)
    assert strip_fences("```\ny = 2") == ("y = 2", None)  # cut off by --max-tokens


def test_quota_error_shows_reason_and_reset() -> None:
    err = ServerError(429, "Quota of 1000 tokens a day used up.", "quota_exceeded", {"retry-after": "3600"})
    assert str(err) == "Quota of 1000 tokens a day used up. (resets: retry after 3600 s)"
    err = ServerError(429, "Quota used up; resets at 12:00 UTC.", "quota_exceeded",
                      {"x-ratelimit-reset-tokens": "6m0s"})
    assert str(err) == "Quota used up; resets at 12:00 UTC. (resets: x-ratelimit-reset-tokens: 6m0s)"
    assert err._render_traceback_() == [f"\x1b[31m{err}\x1b[0m"]


def test_wait_line_says_why_there_is_no_answer_yet() -> None:
    def status(mine: dict[str, Any], other: dict[str, Any], waiting: tuple[str, ...] = ()) -> dict[str, Any]:
        return {"devices": [{"index": 0, "waiting": [{"model": w, "gib": 0.5} for w in waiting]}],
                "models": [{"name": "a", "device": 0, "queue_depth": 1, "in_flight": 0, **mine},
                           {"name": "b", "device": 0, "queue_depth": 0, "in_flight": 0, **other}]}

    assert wait_line("a", status({"state": "swapping_in"}, {"state": "swapping_out", "in_flight": 1}), 3) == \
        "a is waiting for memory: b is answering… (3 s)"
    assert wait_line("a", status({"state": "swapping_in"}, {"state": "running", "in_flight": 2}, ["a"]), 1) == \
        "a is waiting for memory: b is answering… (1 s)"
    # a busy neighbour that is not in the way is not blamed
    assert wait_line("a", status({"state": "swapping_in"}, {"state": "running", "in_flight": 2}), 1) == \
        "a is swapping in… (1 s)"
    assert wait_line("a", status({"state": "running", "queue_depth": 3}, {"state": "running"}), 2) == \
        "a: queued behind 2 request(s)… (2 s)"
    assert wait_line("a", status({"state": "failed", "error": "no GGUF"}, {"state": "running"}), 0) == \
        "a failed: no GGUF"
    assert wait_line("zzz", status({"state": "running"}, {"state": "running"}), 0) is None
    assert [seconds(x) for x in (0.0004, 0.25, 7.14)] == ["<1 ms", "250 ms", "7.1 s"]


def test_quota_refusals_are_one_line_with_reason_and_reset(kernel: ServerKernel, demo_server: ServerHandle) -> None:
    quota = demo_server.url + "swapserve/api/quotas/%2A"
    try:
        r = httpx.put(quota, headers=demo_server.headers(), json={"allowed_models": ["gemma"]}, timeout=30)
        assert r.status_code == 200, r.text
        line = one_line_error(kernel.run("%%llm smollm2\nHello"))
        assert "does not include the model 'smollm2'" in line and "gemma" in line
        httpx.put(quota, headers=demo_server.headers(), json={"allowed_models": None, "tokens_per_day": 0}, timeout=30)
        line = one_line_error(kernel.run("%%llm gemma --max-tokens 4\nThe capital of France is"))
        assert "Token quota used up" in line and "midnight UTC" in line and "retry after" in line
    finally:
        httpx.delete(quota, headers=demo_server.headers(), timeout=30)
    assert kernel.run("%%llm gemma --max-tokens 2\nHello").ok  # the quota lifted, the magic works again

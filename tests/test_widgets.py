"""The ipywidgets in a real kernel started by the real Jupyter server, against the real demo models.

No front end is attached: the widgets' comm messages are read off the kernel's iopub channel, and
their state is checked inside the kernel."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from .server import ServerHandle, free_port
from .test_magics import Run, ServerKernel, start_kernel

pytestmark = pytest.mark.engines

WAIT_FOR = """
import time
def wait_for(cond, timeout=120):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.05)
    return cond()
"""


@pytest.fixture(scope="module")
def kernel(demo_server: ServerHandle) -> Iterator[ServerKernel]:
    k = start_kernel(demo_server)
    assert k.run(WAIT_FOR).ok
    yield k
    k.shutdown()


def widget_updates(run: Run, model_id: str, key: str) -> list[object]:
    """The values of one widget's trait as its comm sent them to the front end, in order."""
    return [m["content"]["data"]["state"][key] for m in run.msgs
            if m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == model_id
            and m["content"]["data"].get("method") == "update" and key in m["content"]["data"].get("state", {})]


def test_panel_shows_the_models_and_follows_swaps(kernel: ServerKernel, demo_server: ServerHandle) -> None:
    assert kernel.run("%llm swap-out gemma").ok
    run = kernel.run("""
        from jupyter_swapserve.kernel.widgets import ModelPanel
        p = ModelPanel()
        display(p)
        print(sorted(p.rows), p.rows["gemma"].state, p.rows["gemma"].memory_label.value)
    """)
    assert run.ok, run.msgs
    assert run.stdout.strip() == "['gemma', 'smollm2'] swapped_out 0.60 GiB"
    assert any(m["msg_type"] == "comm_open" for m in run.msgs)
    assert any("application/vnd.jupyter.widget-view+json" in d for _, _, d in run.displays())

    # a swap made elsewhere (another client of the server) shows up by itself: the panel is live
    r = httpx.post(demo_server.url + "swapserve/api/models/gemma/swap-in", headers=demo_server.headers(),
                   timeout=120)
    assert r.status_code == 200
    run = kernel.run("""
        print(wait_for(lambda: p.rows["gemma"].state == "running"))
        row = p.rows["gemma"]
        print(row.memory_bar.value, row.memory_bar.max, row.swap_in_button.disabled, row.swap_out_button.disabled)
    """)
    assert run.stdout.split() == ["True", "0.6", "1.0", "True", "False"]

    # the panel's button swaps the model out
    run = kernel.run("""
        p.rows["gemma"].swap_out_button.click()
        print(wait_for(lambda: p.rows["gemma"].state == "swapped_out"), p.rows["gemma"].memory_bar.value)
        print(wait_for(lambda: "swapped out" in p.message.value), p.message.value)
    """)
    first, second = run.stdout.strip().splitlines()
    assert first == "True 0.0"
    assert second.startswith("True") and "gemma swapped out" in second
    assert demo_server.model("gemma")["state"] == "swapped_out"
    assert kernel.run("p.close()").ok


def test_panel_without_a_server_says_so_in_one_line(kernel: ServerKernel) -> None:
    run = kernel.run(f"""
        from jupyter_swapserve.kernel.client import Connection, SwapServeClient
        dead = SwapServeClient(Connection("http://127.0.0.1:{free_port()}/", "x", "a test"))
        q = ModelPanel(client=dead, live=False)
        print(q.message.value)
    """)
    assert run.ok, run.msgs
    assert "No jupyter-swapserve server found" in run.stdout and "connection refused" in run.stdout
    assert len(run.stdout.strip().splitlines()) == 1


def test_chat_box_streams_and_remembers(kernel: ServerKernel) -> None:
    run = kernel.run("""
        from jupyter_swapserve.kernel.widgets import ChatBox
        c = ChatBox("smollm2", max_tokens=24, temperature=0, seed=1)
        display(c)
        print(c.transcript.model_id)
        c.prompt.value = "Hi, I am Ada Lovelace."
        c.send_button.click()
        c.wait()
    """)
    assert run.ok, run.msgs
    transcript_id = run.stdout.strip()
    values = widget_updates(run, transcript_id, "value")
    # the answer arrived in pieces: several growing transcripts before the last
    assert len(set(values)) >= 4, values
    assert "Ada Lovelace" in str(values[-1])

    run = kernel.run("""
        c.send("Who am I?")
        c.wait()
        import json
        print(json.dumps(c.conversation))
        print(c.prompt.value == "", c.send_button.disabled, c.stop_button.disabled)
    """)
    assert run.ok, run.msgs
    conv_line, buttons = run.stdout.strip().splitlines()
    conv = json.loads(conv_line)
    assert [t["role"] for t in conv] == ["user", "assistant", "user", "assistant"]
    # the model can only know the name from the first turn, which the second request carried
    assert "Ada" in conv[3]["content"] or "Lovelace" in conv[3]["content"]
    assert buttons == "True False True"

    run = kernel.run("c.clear(); print(c.conversation, repr(c.transcript.value))")
    assert run.stdout.strip() == "[] ''"


def test_chat_box_with_a_base_model_and_stop(kernel: ServerKernel, demo_server: ServerHandle) -> None:
    run = kernel.run("""
        g = ChatBox("gemma", max_tokens=1500)
        g.send("1, 2, 3, 4, 5,")
        print(wait_for(lambda: len(g._partial) > 10))
        g.stop_button.click()
        g.wait()
        print(len(g.conversation), g.status.value)
    """)
    assert run.ok, run.msgs
    started, done = run.stdout.strip().splitlines()
    assert started == "True"
    assert done.startswith("2 ") and "stopped" in done
    # leaving the stream closed the connection: the server ends the request
    deadline = time.monotonic() + 10
    while demo_server.model("gemma")["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert demo_server.model("gemma")["in_flight"] == 0


def test_widget_errors_are_one_line(kernel: ServerKernel) -> None:
    run = kernel.run("""
        bad = ChatBox("nosuch")
        print(bad.status.value)
    """)
    assert run.ok, run.msgs
    assert "Unknown model &#x27;nosuch&#x27;. Available models: gemma, smollm2." in run.stdout
    run = kernel.run("%llm chat nosuch")
    assert not run.ok and len(run.error["traceback"]) == 1  # type: ignore[index]
    assert "Available models: gemma, smollm2" in run.error["traceback"][0]  # type: ignore[index]


def test_line_magics_display_the_widgets(kernel: ServerKernel) -> None:
    for line in ("%llm panel", "%llm chat smollm2"):
        run = kernel.run(line)
        assert run.ok, run.msgs
        assert any("application/vnd.jupyter.widget-view+json" in d for _, _, d in run.displays())

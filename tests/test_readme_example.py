"""The README's first examples, as a newcomer runs them against the demo: the Python example's chat
request (the `openai` client) and the curl one, parsed out of README.md and run as they stand (only
the server's address and token are this test server's). Their answer must be a sensible one: it
names Paris. The demo's smollm2 has a `system_prompt` in examples/demo.yaml, which the chat route
puts first when a request has none, and `request_defaults` (greedy sampling unless a request asks
otherwise); without them SmolLM2-135M rambles ("Cape Verde is a sovereign territory…")."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess

import httpx
import pytest

from jupyter_swapserve.config import load_models_file
from jupyter_swapserve.handlers.openai import with_request_defaults, with_system_prompt

from .server import DEMO_MODELS, ROOT, ServerHandle

README = (ROOT / "README.md").read_text()
README_URL = "http://127.0.0.1:8888/"
README_TOKEN = "<jupyter token>"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def first_curl_chat() -> str:
    """The README's first curl command to the chat route, continuation lines joined."""
    for block in blocks("bash"):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("curl") and "/chat/completions" in line:
                command = [line]
                while command[-1].rstrip().endswith("\\"):
                    i += 1
                    command.append(lines[i])
                return "\n".join(command)
    raise AssertionError("README.md has no curl example of the chat route")


def python_example() -> tuple[list[ast.stmt], ast.expr]:
    """The README's first Python block: the statements before its first chat request, and that request."""
    for block in blocks("python"):
        tree = ast.parse(block)
        for i, stmt in enumerate(tree.body):
            if isinstance(stmt, ast.Expr) and "chat.completions.create" in ast.unparse(stmt.value):
                return tree.body[:i], stmt.value
    raise AssertionError("README.md has no Python chat example")


class ThisServer(ast.NodeTransformer):
    """The README's address and token → this test server's."""

    def __init__(self, server: ServerHandle) -> None:
        self.server = server

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        if isinstance(node.value, str):
            value = node.value.replace(README_URL, self.server.url).replace(README_TOKEN, self.server.token)
            return ast.copy_location(ast.Constant(value), node)
        return node


def test_the_demo_gives_smollm2_its_system_prompt_and_sampling() -> None:
    demo = {m.name: m for m in load_models_file(DEMO_MODELS).models}
    assert demo["smollm2"].system_prompt and demo["gemma"].system_prompt is None
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}
    added = with_system_prompt(body, demo["smollm2"].system_prompt)
    assert added["messages"] == [{"role": "system", "content": demo["smollm2"].system_prompt},
                                 {"role": "user", "content": "Hi"}]
    assert body["messages"] == [{"role": "user", "content": "Hi"}]  # the client's body is not changed
    own = {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    assert with_system_prompt(own, "ignored") is own  # a request's own system message wins
    assert with_system_prompt(body, None) is body
    assert demo["smollm2"].request_defaults == {"temperature": 0}
    assert with_request_defaults(body, {"temperature": 0})["temperature"] == 0
    assert with_request_defaults({**body, "temperature": 0.9}, {"temperature": 0})["temperature"] == 0.9
    assert with_request_defaults(body, {}) is body


@pytest.mark.engines
def test_the_readme_python_example_answers_paris(demo_server: ServerHandle) -> None:
    setup, request = python_example()
    namespace: dict = {}
    module = ast.fix_missing_locations(ThisServer(demo_server).visit(ast.Module(body=setup, type_ignores=[])))
    exec(compile(module, "README.md", "exec"), namespace)  # the README's own code
    call = ast.fix_missing_locations(ThisServer(demo_server).visit(ast.Expression(body=request)))
    answer = eval(compile(call, "README.md", "eval"), namespace)
    text = answer.choices[0].message.content
    print("README Python example answered:", text)
    assert "Paris" in text, text


@pytest.mark.engines
def test_the_readme_curl_example_answers_paris(demo_server: ServerHandle) -> None:
    command = first_curl_chat().replace(README_URL, demo_server.url)
    done = subprocess.run(["bash", "-c", command], env={**os.environ, "TOKEN": demo_server.token},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    text = answer["choices"][0]["message"]["content"]
    print("README curl example answered:", text)
    assert "Paris" in text, text
    # a served request is a real use of the model: the status says when it was
    smollm2 = next(m for m in httpx.get(demo_server.url + "swapserve/api/status", headers=demo_server.headers(),
                                        timeout=30).json()["models"] if m["name"] == "smollm2")
    assert smollm2["last_request"] is not None

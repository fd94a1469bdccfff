"""binder/ works: the repo2docker steps (binder/requirements.txt, binder/postBuild, binder/start) run in a
fresh virtual environment, as Binder runs them in a fresh image, and the server they start serves
the demo models, opens the quickstart, has the sidebar, and jupyter-ai (the real package, installed
by binder/requirements.txt) reaches the models through the swap route with the user's token.

No container registry is reachable here, so the image itself is not built. The test stays cheap:
pip's cache serves the packages, and llama-cpp-python comes from the wheel that scripts/setup.sh
(and binder/postBuild) keep under ~/.cache/jupyter-swapserve/wheels, so llama.cpp is not compiled again.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from jupyter_core.paths import jupyter_runtime_dir

from .server import ROOT, ServerHandle, free_port
from .test_magics import ServerKernel

BINDER = ROOT / "binder"


def test_binder_files_are_repo2docker_shaped() -> None:
    assert os.access(BINDER / "postBuild", os.X_OK) and os.access(BINDER / "start", os.X_OK)
    start = (BINDER / "start").read_text()
    assert start.startswith("#!") and 'exec "$@"' in start  # repo2docker runs the server through it
    requirements = (BINDER / "requirements.txt").read_text()
    assert re.search(r"^jupyter-ai\b", requirements, re.M)


def test_postbuild_builds_the_llama_cpp_version_setup_sh_builds() -> None:
    def version(path: Path) -> str:
        found = re.search(r"^LLAMA_CPP_VERSION=(\S+)$", path.read_text(), re.M)
        assert found, f"{path} sets no LLAMA_CPP_VERSION"
        return found.group(1)

    assert version(BINDER / "postBuild") == version(ROOT / "scripts" / "setup.sh")


def test_readme_has_the_binder_badge() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "mybinder.org/badge_logo.svg" in readme
    assert "urlpath=lab/tree/examples/01-quickstart.ipynb" in readme


@pytest.fixture(scope="module")
def binder_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with binder/requirements.txt and binder/postBuild applied, as repo2docker does."""
    venv = tmp_path_factory.mktemp("binder") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = _env(venv)
    log = venv / "build.log"
    with open(log, "wb") as out:
        for argv in (["python", "-m", "pip", "install", "-q", "-r", str(BINDER / "requirements.txt")],
                     [str(BINDER / "postBuild")]):
            done = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1500)
            assert done.returncode == 0, f"{argv} failed:\n{log.read_text()[-4000:]}"
    return venv


def _env(venv: Path) -> dict[str, str]:
    """The environment of a fresh image: this venv's tools first, nothing of the test's venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not k.startswith(("JUPYTER_", "SWAPSERVE_"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@contextlib.contextmanager
def _binder_server(venv: Path, tmp: Path) -> Iterator[ServerHandle]:
    port, token = free_port(), secrets.token_hex(16)
    log_path = tmp / "server.log"
    argv = [str(BINDER / "start"), "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
            f"--SwapServe.quota_db_url=sqlite:///{tmp}/quotas.sqlite", f"--SwapServe.event_log={tmp}/events.jsonl"]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    # the runtime dir is this process's: ServerKernel finds the kernels' connection files there
    env = {**_env(venv), "JUPYTER_CONFIG_DIR": str(tmp / "config"), "JUPYTER_DATA_DIR": str(tmp / "data"),
           "JUPYTER_RUNTIME_DIR": jupyter_runtime_dir()}
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    handle = ServerHandle(f"http://127.0.0.1:{port}/", token, proc, log_path, ROOT)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"binder/start exited with {proc.returncode}:\n{handle.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(handle.url + "api/status", headers=handle.headers(), timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the binder server did not start:\n{handle.log()}")
            time.sleep(0.5)
        yield handle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.engines
def test_binder_environment_serves_the_demo_and_jupyter_ai_uses_the_route(binder_env: Path, tmp_path: Path) -> None:
    labextensions = subprocess.run([str(binder_env / "bin" / "jupyter"), "labextension", "list"],
                                   capture_output=True, text=True, env=_env(binder_env))
    assert "jupyter-swapserve" in labextensions.stdout + labextensions.stderr  # the sidebar ships in the wheel
    with _binder_server(binder_env, tmp_path) as server:
        assert server.status()["models"], f"binder/postBuild's models file was not picked up:\n{server.log()}"
        status = server.wait_models(timeout=300)
        assert {m["name"] for m in status["models"]} == {"gemma", "smollm2"}
        # the landing page is the quickstart
        landing = httpx.get(server.url, headers=server.headers(), follow_redirects=False, timeout=30)
        assert landing.status_code in (301, 302) and landing.headers["location"].split("?")[0].endswith(
            "/lab/tree/examples/01-quickstart.ipynb")
        # both served models answer through the route
        chat = httpx.post(server.api + "/chat/completions", headers=server.headers(), timeout=300, json={
            "model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24, "temperature": 0})
        assert chat.status_code == 200, chat.text
        assert "Paris" in chat.json()["choices"][0]["message"]["content"]
        completion = httpx.post(server.api + "/completions", headers=server.headers(), timeout=300, json={
            "model": "gemma", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        assert completion.status_code == 200, completion.text
        assert completion.json()["choices"][0]["text"].strip()

        # jupyter-ai in a kernel of this server: %%ai through an alias to the route, with the user's token
        kernel = ServerKernel(server)
        try:
            setup = kernel.run(
                "import os\n"
                "os.environ['OPENAI_API_KEY'] = os.environ['SWAPSERVE_TOKEN']\n"
                "url = os.environ['SWAPSERVE_URL']\n"
                "%load_ext jupyter_ai_magic_commands\n"
                "%ai alias smollm2 openai/smollm2 --api-base {url}")
            assert setup.ok, setup.error or setup.stderr
            asked = kernel.run("%%ai smollm2 -f text\nWhat is the capital of France? Answer in one word.")
            # the magic reports a failed call on stderr ("Error calling language model: ...") and returns
            assert asked.ok and "Error" not in asked.stderr, asked.error or asked.stderr
            shown = " ".join(str(v) for m in asked.msgs if m["msg_type"] in ("display_data", "execute_result")
                             for v in m["content"]["data"].values()) + asked.stdout
            assert "Paris" in shown, shown[:2000]
            # Jupyternaut (the chat) builds its model as ChatLiteLLM(**model_parameters[model], model=model):
            # the same call with the documented c.JupyternautExtension.model_parameters
            chat_model = kernel.run(
                "from jupyter_ai_jupyternaut.jupyternaut.chat_models import ChatLiteLLM\n"
                "params = {'api_base': url, 'openai_api_key': os.environ['SWAPSERVE_TOKEN'], 'temperature': 0}\n"
                "reply = ChatLiteLLM(**params, model='openai/smollm2').invoke('What is the capital of France?')\n"
                "print('jupyternaut:', reply.content)")
            assert chat_model.ok, chat_model.error or chat_model.stderr
            assert "Paris" in chat_model.stdout
        finally:
            kernel.shutdown()
        # both jupyter-ai calls came through the route, counted for this server's user
        usage = httpx.get(server.url + "swapserve/api/usage", headers=server.headers(), timeout=30).json()
        smollm2 = [u for u in usage["usage"] if u["model"] == "smollm2"]
        assert smollm2 and smollm2[0]["requests"] >= 3

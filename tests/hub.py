"""A real JupyterHub (PyPI jupyterhub, configurable-http-proxy from npm) running
examples/jupyterhub_config.py: the shared swap service as a hub service, users' servers spawned
as local processes in client mode. For tests/test_hub.py and the browser tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from .server import DEMO_MODELS, ROOT, free_port

CHP = ROOT / ".hub-tools" / "node_modules" / ".bin" / "configurable-http-proxy"
ADMIN_TOKEN_SCOPES = ["admin:users", "admin:servers", "tokens", "read:services", "list:users"]


def hub_available() -> str | None:
    """Why the hub test cannot run here, or None."""
    try:
        import jupyterhub  # noqa: F401
    except ImportError:
        return "jupyterhub is not installed (pip install 'jupyter-swapserve[hub]')"
    if not CHP.exists() and not shutil.which("configurable-http-proxy"):
        return "configurable-http-proxy is not installed (bash scripts/setup.sh test installs it)"
    return None


@dataclass
class NodeService:
    """A GPU node's swap service, registered with the hub as an external service (no command: the
    test starts and stops it, as Kubernetes would its pod) with the environment deploy/kubernetes
    gives the node's container."""

    name: str  # the hub service: swapserve-<node>
    port: int
    models_file: Path
    token: str
    log_path: Path
    proc: subprocess.Popen | None = None


@dataclass
class Hub:
    url: str  # the public URL, ending in "/"
    admin_token: str
    proc: subprocess.Popen
    workdir: Path
    service_port: int
    api_port: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, NodeService] = field(default_factory=dict)

    def api(self, path: str, method: str = "GET", **kwargs: object) -> httpx.Response:
        return httpx.request(method, f"{self.url}hub/api/{path}".rstrip("/"), timeout=60,
                             headers={"Authorization": f"token {self.admin_token}"}, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return (self.workdir / "hub.log").read_text(errors="replace")[-8000:]

    def add_user(self, name: str) -> str:
        """Create the user, start their server, and return a token of theirs."""
        r = self.api(f"users/{name}", "POST")
        assert r.status_code in (201, 409), r.text
        r = self.api(f"users/{name}/server", "POST")
        assert r.status_code in (201, 202, 400), r.text  # 400: already running
        deadline = time.monotonic() + 180
        while True:
            model = self.api(f"users/{name}").json()
            server = (model.get("servers") or {}).get("")
            if server and server.get("ready"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}'s server did not start: {model}\n{self.log()}")
            time.sleep(0.5)
        r = self.api(f"users/{name}/tokens", "POST", json={"note": "test", "expires_in": 3600})
        assert r.status_code == 201, r.text
        self.tokens[name] = r.json()["token"]
        return self.tokens[name]

    def user_url(self, name: str) -> str:
        return f"{self.url}user/{name}/"

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"token {self.tokens[name]}"}

    def service_url(self) -> str:
        """The shared service through the hub's proxy."""
        return f"{self.url}services/swapserve/"

    def service_direct_url(self) -> str:
        """The shared service on its own port, as a local process could reach it past the proxy."""
        return f"http://127.0.0.1:{self.service_port}/services/swapserve/"

    def service_environ(self) -> dict[str, str]:
        """The environment of the running service's process (its hub token is there)."""
        url = f"http://127.0.0.1:{self.service_port}"
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                raw = (entry / "environ").read_bytes()
            except OSError:
                continue
            env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
            if env.get("JUPYTERHUB_SERVICE_NAME") == "swapserve" and env.get("JUPYTERHUB_SERVICE_URL") == url:
                return env
        raise LookupError(f"no process of the service at {url}")

    def browser(self, name: str) -> httpx.Client:
        """A browser session: logged in to the hub as ``name`` (the demo's dummy authenticator), then
        to the user's own server and to the service through the hub's OAuth, cookies kept."""
        client = httpx.Client(follow_redirects=True, timeout=60)
        client.get(f"{self.url}hub/login").raise_for_status()
        r = client.post(f"{self.url}hub/login", data={"username": name, "password": "any",
                                                       "_xsrf": client.cookies.get("_xsrf", path="/hub/")})
        assert r.status_code == 200 and "jupyterhub-hub-login" in {c.name for c in client.cookies.jar}, r.text[:300]
        for page in (self.user_url(name) + "lab", self.service_url()):
            # a page of each server starts its OAuth: hub authorize, the server's callback, its cookie
            r = client.get(page)
            assert r.status_code == 200, (page, r.status_code, r.text[:300])
        return client

    # ---- several nodes ---------------------------------------------------------------------------
    def node_env(self, node: NodeService) -> dict[str, str]:
        """What an external service is told (deploy/kubernetes/gpu1.yaml sets the same JUPYTERHUB_*)."""
        prefix = f"/services/{node.name}/"
        return {
            "JUPYTERHUB_SERVICE_NAME": node.name,
            "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{node.port}",
            "JUPYTERHUB_SERVICE_PREFIX": prefix,
            "JUPYTERHUB_BASE_URL": "/",
            "JUPYTERHUB_API_URL": f"http://127.0.0.1:{self.api_port}/hub/api",
            "JUPYTERHUB_CLIENT_ID": f"service-{node.name}",
            "JUPYTERHUB_OAUTH_CALLBACK_URL": f"{prefix}oauth_callback",
            "JUPYTERHUB_API_TOKEN": node.token,
        }

    def start_node(self, name: str, quota_db_url: str) -> None:
        node = self.nodes[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTERHUB_")}
        env.update(self.node_env(node), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                   JUPYTER_DATA_DIR=str(self.workdir / node.name / "data"),
                   JUPYTER_RUNTIME_DIR=str(self.workdir / node.name / "runtime"))
        log = open(node.log_path, "ab")
        node.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter_swapserve.hub", f"--SwapServe.models_file={node.models_file}",
             f"--SwapServe.quota_db_url={quota_db_url}"],
            cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def stop_node(self, name: str) -> None:
        """Stop the node's service as Kubernetes stops a pod: SIGTERM (it stops its engines), then SIGKILL."""
        node = self.nodes[name]
        if node.proc is None or node.proc.poll() is not None:
            return
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(node.proc.pid, signal.SIGKILL)
            node.proc.wait()

    def node_url(self, name: str) -> str:
        """The node's service on its own port (where the hub's proxy sends /services/<name>/)."""
        node = self.nodes[name]
        return f"http://127.0.0.1:{node.port}/services/{node.name}/"

    def node_log(self, name: str) -> str:
        return self.nodes[name].log_path.read_text(errors="replace")[-6000:]


@contextlib.contextmanager
def run_hub(models_file: Path | str = DEMO_MODELS, admins: str = "teacher", nodes: dict[str, Path] | None = None,
            quota_db_url: str | None = None, extra_config: str = "") -> Iterator[Hub]:
    """A hub with the example's one managed service, or with ``nodes`` (node name → models file):
    one external swap service per node, ``swapserve-<node>``, started here, sharing ``quota_db_url``.
    ``extra_config``: lines of hub configuration after all that (a test's own settings)."""
    workdir = Path(tempfile.mkdtemp(prefix="swapserve-hub-"))
    port, service_port, api_port = free_port(), free_port(), free_port()
    admin_token = os.urandom(16).hex()
    config = workdir / "jupyterhub_config.py"
    node_services = {name: NodeService(f"swapserve-{name}", free_port(), Path(path), os.urandom(16).hex(),
                                       workdir / f"swapserve-{name}.log") for name, path in (nodes or {}).items()}
    external = {n.name: n.token for n in node_services.values()}
    # the example as it is, plus a token for the test itself (an admin service without a process),
    # and the nodes' services made external (the test runs them, with tokens of their own)
    config.write_text(
        f"load_subconfig({str(ROOT / 'examples' / 'jupyterhub_config.py')!r})\n"
        "c.JupyterHub.services.append({'name': 'test-admin', 'api_token': %r})\n"
        "c.JupyterHub.load_roles.append({'name': 'test-admin', 'scopes': %r, 'services': ['test-admin']})\n"
        "c.JupyterHub.cookie_secret_file = %r\n"
        "c.JupyterHub.db_url = %r\n"
        "c.SimpleLocalProcessSpawner.home_dir_template = %r\n"
        % (admin_token, ADMIN_TOKEN_SCOPES, str(workdir / "cookie_secret"), f"sqlite:///{workdir / 'hub.sqlite'}",
           str(workdir / "home" / "{username}"))
        + "for service in c.JupyterHub.services:\n"
          f"    if service['name'] in {sorted(external)!r}:\n"
          "        del service['command'], service['environment']\n"
          f"        service['api_token'] = {external!r}[service['name']]\n"
        + extra_config
    )
    env = {
        **os.environ,
        "SWAPSERVE_HUB_PORT": str(port), "SWAPSERVE_HUB_API_PORT": str(api_port),
        "SWAPSERVE_PROXY_API_PORT": str(free_port()), "SWAPSERVE_SERVICE_PORT": str(service_port),
        "SWAPSERVE_CHP": str(CHP) if CHP.exists() else "configurable-http-proxy",
        "SWAPSERVE_MODELS_FILE": str(models_file),
        "SWAPSERVE_QUOTA_DB_URL": quota_db_url or f"sqlite:///{workdir / 'quotas.sqlite'}",
        **({"SWAPSERVE_NODES": json.dumps([{"name": name, "models_file": str(n.models_file), "port": n.port}
                                           for name, n in node_services.items()])}
           if nodes else {}),
        "SWAPSERVE_ADMINS": admins,
        "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    log = open(workdir / "hub.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(config)], cwd=workdir, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    hub = Hub(f"http://127.0.0.1:{port}/", admin_token, proc, workdir, service_port, api_port,
              nodes={n.name: n for n in node_services.values()})
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"jupyterhub exited with {proc.returncode}:\n{hub.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if hub.api("").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyterhub did not start:\n{hub.log()}")
            time.sleep(0.3)
        for name in hub.nodes:
            hub.start_node(name, quota_db_url or f"sqlite:///{workdir / 'quotas.sqlite'}")
        yield hub
    finally:
        for name in hub.nodes:
            with contextlib.suppress(Exception):
                hub.stop_node(name)
        with contextlib.suppress(Exception):
            for name in list(hub.tokens):
                hub.api(f"users/{name}/server", "DELETE")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the hub stops its services and the servers it spawned
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()

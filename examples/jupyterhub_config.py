# A JupyterHub with one shared jupyter-swapserve service for all its users (docs/hub.md).
#   jupyterhub -f examples/jupyterhub_config.py
# The hub runs `jupyter swapserve` as a managed service; every user's server runs the extension in
# client mode and forwards /swapserve/ to it with the user's hub token. tests/test_hub.py runs this
# file as it is, with the SWAPSERVE_* variables below pointing at its own ports and files.
# For a real site, replace the authenticator and the spawner, and the demo models file.
import json
import os
import sys

c = get_config()  # noqa: F821 (JupyterHub's config loader defines it)
here = os.path.dirname(os.path.abspath(__file__))
env = os.environ.get

# ---- the hub and its proxy -------------------------------------------------------------------
c.JupyterHub.bind_url = f"http://127.0.0.1:{env('SWAPSERVE_HUB_PORT', '8000')}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = int(env("SWAPSERVE_HUB_API_PORT", "8081"))
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env('SWAPSERVE_PROXY_API_PORT', '8001')}"
c.ConfigurableHTTPProxy.command = [env("SWAPSERVE_CHP", "configurable-http-proxy")]

# ---- who logs in, and where their servers run (demo: replace both on a real site) -------------
c.JupyterHub.authenticator_class = "dummy"  # any user name, no password: a demo and test setting only
c.Authenticator.allow_all = True
c.Authenticator.admin_users = {"admin"}
c.JupyterHub.spawner_class = "simple"  # SimpleLocalProcessSpawner: no system accounts; testing only
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]
c.Spawner.default_url = "/lab"
c.Spawner.http_timeout = 120
if os.geteuid() == 0:
    c.Spawner.args = ["--allow-root"]  # the demo spawner runs every server as the hub's own user

# ---- the shared swap services: one per GPU node ---------------------------------------------------
# One node by default: the service "swapserve". Several (tests/test_nodes.py; on Kubernetes see
# deploy/kubernetes/): SWAPSERVE_NODES, a JSON list of {"name", "models_file", "port"}, makes one
# service "swapserve-<name>" per node; users' servers find them all by the name prefix "swapserve"
# and send each request to the node that serves its model.
service_args = []
if env("SWAPSERVE_QUOTA_DB_URL"):  # one database for every node: one budget per user (PostgreSQL)
    service_args.append(f"--SwapServe.quota_db_url={env('SWAPSERVE_QUOTA_DB_URL')}")
nodes = json.loads(env("SWAPSERVE_NODES") or "[]") or [
    {"name": "", "models_file": env("SWAPSERVE_MODELS_FILE", os.path.join(here, "demo.yaml")),
     "port": int(env("SWAPSERVE_SERVICE_PORT", "10101"))},
]
c.JupyterHub.services = [
    {
        "name": "swapserve-" + node["name"] if node["name"] else "swapserve",
        "url": f"http://127.0.0.1:{node['port']}",
        "command": [sys.executable, "-m", "jupyter_swapserve.hub", f"--SwapServe.models_file={node['models_file']}",
                    *service_args],
        "oauth_no_confirm": True,  # the sidebar's browser login goes straight through
        "environment": {"HF_HUB_OFFLINE": "1"},
    }
    for node in nodes
]
swapserve_services = [service["name"] for service in c.JupyterHub.services]

# ---- who may use them --------------------------------------------------------------------------
# Users may call the services; their servers' tokens may too (client mode forwards with them), may
# list the hub's services and read the swap services' URLs (discovery). Holders of
# custom:swapserve:admin administer quotas.
use_services = [f"{scope}!service={name}" for name in swapserve_services
                for scope in ("access:services", "read:services")]
c.JupyterHub.custom_scopes = {
    "custom:swapserve:admin": {"description": "Set quotas and read everyone's usage on the shared swap service."},
}
c.JupyterHub.load_roles = [
    # a server's token holds only what its user holds too: list:services in both
    {"name": "user", "scopes": ["self", "list:services", *use_services]},
    {"name": "server", "scopes": ["users:activity!user", "access:servers!server", "list:services", *use_services,
                                  "custom:swapserve:admin"]},
    {"name": "swapserve-admin", "scopes": ["custom:swapserve:admin"],
     "users": [u for u in env("SWAPSERVE_ADMINS", "teacher").split(",") if u]},
    # the services themselves may list the hub's user names (and nothing more about them): their
    # admins pick users from that list in the sidebar's quota form (GET /swapserve/api/users, admins only)
    {"name": "swapserve-service", "scopes": ["list:users", "read:users:name"], "services": swapserve_services},
]

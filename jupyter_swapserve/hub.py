"""JupyterHub glue: the shared swap service as a hub-managed service, and how users' servers find it.

``jupyter swapserve`` runs a Jupyter server whose only job is the swap service, bound to the URL
and prefix JupyterHub gives the service (``JUPYTERHUB_SERVICE_URL``/``_PREFIX``). Users are
authenticated by JupyterHub's own service auth (:class:`jupyterhub.services.auth.HubOAuth`: API
tokens in ``Authorization: token|Bearer``, OAuth cookies for browsers) and must hold the access
scope ``access:services!service=<name>``, which a hub role grants. Everything the Jupyter server
offers besides the swap service (kernels, contents, terminals) is refused: a user who may use the
models must not run code as the service's system user.

Each user's single-user server runs the extension in *client mode* (see :func:`discover_upstream`
and ``handlers/proxy.py``): its ``/swapserve/*`` routes forward to this service with the server's
hub token, which JupyterHub owns on the user's behalf, so every request is the user's.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlparse

from jupyter_server.auth.authorizer import Authorizer
from jupyter_server.auth.identity import User

log = logging.getLogger(__name__)

SERVICE_NAME = "swapserve"
#: the resource name our handlers authorize against (SwapServeHandler.auth_resource)
RESOURCE = "swapserve"

try:  # the hub extra: only the service and the user servers under a hub need it
    from jupyterhub.singleuser.extension import JupyterHubIdentityProvider

    HAVE_JUPYTERHUB = True
except ImportError:  # pragma: no cover - exercised where jupyterhub is not installed
    JupyterHubIdentityProvider = object  # type: ignore[misc,assignment]
    HAVE_JUPYTERHUB = False


class SwapServeHubIdentityProvider(JupyterHubIdentityProvider):  # type: ignore[misc,valid-type]
    """JupyterHub's identity provider for user servers, used by a service, with one change: a
    request that presents a token is judged by that token alone. HubAuth falls back to the OAuth
    cookie when a token is wrong; an API client that sends credentials must get exactly those
    checked (a wrong ``Authorization`` header beside a valid cookie is refused)."""

    async def get_user(self, handler: Any) -> User | None:  # type: ignore[override]
        if hasattr(handler, "_jupyterhub_user"):
            return handler._jupyterhub_user
        token = self.hub_auth.get_token(handler, in_cookie=False)
        if token:
            model = self.hub_auth.user_for_token(token, session_id=self.hub_auth.get_session_id(handler),
                                                 sync=False)
            if isinstance(model, Awaitable):
                model = await model
            if not model:
                handler._jupyterhub_user = None
                return None
        return await super().get_user(handler)


class SwapServeHubAuthorizer(Authorizer):
    """Only the swap service's own routes, and only for users holding the service's access scope."""

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        if resource != RESOURCE:
            return False  # kernels, contents, terminals, sessions...: not offered by the shared service
        hub_user = getattr(user, "hub_user", None)
        provider = self.identity_provider
        if not isinstance(hub_user, dict) or not hasattr(provider, "hub_auth"):
            return False
        return bool(provider.hub_auth.check_scopes(provider.hub_auth.access_scopes, hub_user))


def service_argv(environ: dict[str, str] | None = None) -> list[str]:
    """The Jupyter server's command-line options for running as the hub's service."""
    env = os.environ if environ is None else environ
    url = env.get("JUPYTERHUB_SERVICE_URL")
    if not url:
        raise SystemExit("jupyter swapserve: JUPYTERHUB_SERVICE_URL is not set; run it as a JupyterHub service "
                         "(c.JupyterHub.services), or run `jupyter lab` for a standalone server")
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return [
        f"--ServerApp.ip={parsed.hostname or '127.0.0.1'}",
        f"--ServerApp.port={port}",
        f"--ServerApp.base_url={env.get('JUPYTERHUB_SERVICE_PREFIX') or '/'}",
        "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False",
        "--ServerApp.identity_provider_class=jupyter_swapserve.hub.SwapServeHubIdentityProvider",
        "--ServerApp.authorizer_class=jupyter_swapserve.hub.SwapServeHubAuthorizer",
        "--ServerApp.default_url=/swapserve/api/status",
        # the service forwards only to engines on 127.0.0.1; users' servers reach it from the hub's network
        "--ServerApp.allow_remote_access=True",
        "--SwapServe.mode=service",
    ]


def main(argv: list[str] | None = None) -> None:
    """``jupyter swapserve [--SwapServe.models_file=...] [other Jupyter server options]``."""
    if not HAVE_JUPYTERHUB:
        raise SystemExit("jupyter swapserve: the shared-node mode needs JupyterHub's service auth: "
                         "pip install 'jupyter-swapserve[hub]'")
    from jupyter_server.serverapp import ServerApp

    args = list(sys.argv[1:] if argv is None else argv)
    if os.geteuid() == 0 and "--allow-root" not in args:
        args.append("--allow-root")  # hub services run as the hub's user, often root on a node
    ServerApp.launch_instance(argv=[*service_argv(), *args])


# ---- client mode ---------------------------------------------------------------------------
def discover_upstream(service_name: str = SERVICE_NAME, environ: dict[str, str] | None = None,
                      timeout: float = 5.0) -> str | None:
    """The shared service's URL (ending in '/') for a user's server spawned by JupyterHub: from
    ``SWAPSERVE_UPSTREAM_URL`` if the spawner sets it, else from the hub's API
    (``GET /hub/api/services/<name>``, with the server's own token). None without a hub, or when
    the hub has no such service (the server then runs its own engines, as a standalone one)."""
    env = os.environ if environ is None else environ
    explicit = env.get("SWAPSERVE_UPSTREAM_URL")
    if explicit:
        return explicit.rstrip("/") + "/"
    api_url, token = env.get("JUPYTERHUB_API_URL"), env.get("JUPYTERHUB_API_TOKEN")
    if not api_url or not token:
        return None
    import httpx

    try:
        r = httpx.get(f"{api_url.rstrip('/')}/services/{service_name}",
                      headers={"Authorization": f"token {token}"}, timeout=timeout)
    except httpx.HTTPError as exc:
        log.warning("jupyter-swapserve: the hub at %s did not answer (%s); no shared service", api_url, exc)
        return None
    if r.status_code != 200:
        if r.status_code == 403:
            log.warning("jupyter-swapserve: this server's token may not read the hub service '%s' (grant the "
                        "server role read:services!service=%s), or set SWAPSERVE_UPSTREAM_URL",
                        service_name, service_name)
        return None
    info = r.json()
    url, prefix = info.get("url"), info.get("prefix") or f"/services/{service_name}/"
    if not url:
        return None
    # the service's own address (what the proxy forwards to), with the prefix it serves under
    return url.rstrip("/") + "/" + prefix.strip("/") + "/"


if __name__ == "__main__":  # python -m jupyter_swapserve.hub: the same as `jupyter swapserve`
    main()

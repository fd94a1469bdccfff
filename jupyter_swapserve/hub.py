"""JupyterHub glue: the shared swap service as a hub-managed service, and how users' servers find it.

``jupyter swapserve`` runs a Jupyter server whose only job is the swap service, bound to the URL
and prefix JupyterHub gives the service (``JUPYTERHUB_SERVICE_URL``/``_PREFIX``). Users are
authenticated by JupyterHub's own service auth (:class:`jupyterhub.services.auth.HubOAuth`: API
tokens in ``Authorization: token|Bearer``, OAuth cookies for browsers) and must hold the access
scope ``access:services!service=<name>``, which a hub role grants. The service's server
(:class:`SwapServeServiceApp`) serves the swap routes, the OAuth callback and nothing else: no
JupyterLab, no kernels, contents or files of the service's system user, and no page that could
carry the service's own hub token.

Each user's single-user server runs the extension in *client mode* (see :func:`discover_upstreams`
and ``handlers/proxy.py``): its ``/swapserve/*`` routes forward to this service with the server's
hub token, which JupyterHub owns on the user's behalf, so every request is the user's.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlparse

from jupyter_server.auth.authorizer import Authorizer
from jupyter_server.serverapp import ServerApp
from jupyter_server.utils import url_path_join
from tornado import web

from .handlers.base import ERROR_TYPES, SwapServeHandler
from .handlers.fallback import NotFoundHandler

log = logging.getLogger(__name__)

SERVICE_NAME = "swapserve"
#: the resource name our handlers authorize against (SwapServeHandler.auth_resource)
RESOURCE = "swapserve"
#: the one server extension the service loads
SERVER_EXTENSION = "jupyter_swapserve"

try:  # the hub extra: only the service and the user servers under a hub need it
    from jupyterhub.singleuser.extension import JupyterHubIdentityProvider, JupyterHubOAuthCallbackHandler

    HAVE_JUPYTERHUB = True
except ImportError:  # pragma: no cover - exercised where jupyterhub is not installed
    JupyterHubIdentityProvider = JupyterHubOAuthCallbackHandler = object  # type: ignore[misc,assignment]
    HAVE_JUPYTERHUB = False


class SwapServeHubIdentityProvider(JupyterHubIdentityProvider):  # type: ignore[misc,valid-type]
    """JupyterHub's identity provider for user servers, used by the service, with no token of its
    own to show. jupyter_server puts ``identity_provider.token`` in every page it renders and in
    JupyterLab's page config; JupyterHub's provider answers with the server's own hub API token,
    which for the service is the service's credential at the hub (and its OAuth client secret).
    The service's HubAuth keeps the token; nothing that renders a response can read it here."""

    @property
    def token(self) -> str:  # type: ignore[override]
        return ""

    def get_handlers(self) -> list[tuple]:
        # only the OAuth callback: the logout page is jupyter_server's (HTML); the service has no pages
        return [("/oauth_callback", ServiceOAuthCallbackHandler, {"hub_auth": self.hub_auth})]


class ServiceOAuthCallbackHandler(JupyterHubOAuthCallbackHandler):  # type: ignore[misc,valid-type]
    """JupyterHub's OAuth callback (a browser's login to the service ends here), with errors in
    OpenAI's JSON shape like every other answer of the service."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"message": message, "type": ERROR_TYPES.get(status_code, "api_error"),
                                          "param": None, "code": "oauth_failed"}}))


async def token_is_valid(hub_auth: Any, presented: str, handler: Any) -> bool:
    """Whether ``presented`` authenticates ``handler``'s request at the hub: a token that HubAuth
    reads from this request (not a ``?token=`` it ignores) and that the hub knows."""
    if not presented or presented != hub_auth.get_token(handler, in_cookie=False):
        return False
    model = hub_auth.user_for_token(presented, session_id=hub_auth.get_session_id(handler), sync=False)
    if isinstance(model, Awaitable):
        model = await model
    return bool(model)


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


class ServiceHomeHandler(SwapServeHandler):
    """``<prefix>`` (the service's URL on the hub): where a browser logs in to the service. Without
    a login it is sent through the hub's OAuth (and back to the callback); with one, to the status."""

    def get_login_url(self) -> str:
        # a page, not an API route (APIHandler refuses to redirect): JupyterHub's provider wraps
        # this into its OAuth redirect
        return web.RequestHandler.get_login_url(self)

    async def get(self) -> None:
        if not self.current_user:
            self.redirect(self.get_login_url())  # raises 403 for a hub user without the access scope
            return
        self.require_user("read")
        self.redirect(self.settings["default_url"])


class SwapServeServiceApp(ServerApp):
    """The Jupyter server of ``jupyter swapserve``: the swap service and nothing else.

    Three layers, each enough on its own for what it covers:
    - no other server extension is loaded (JupyterLab and its settings and workspaces, notebook,
      the language servers, terminals), whatever the environment enables;
    - none of jupyter_server's services (kernels, contents, files, nbconvert, kernelspecs, ...);
    - after the extension's routes, every other path is a JSON 404 (401 without credentials),
      so jupyter_server's remaining handlers (static files, /api, /metrics, its HTML 404 page)
      are never reached, on the hub's proxy or on the service's port.
    The authorizer refuses every resource but the swap service's, and the identity provider
    shows no token, for whatever might still render."""

    name = "jupyter-swapserve"
    description = "The shared swap service of a JupyterHub"
    default_services = ()

    def find_server_extensions(self) -> None:
        self.jpserver_extensions = {SERVER_EXTENSION: True}

    def init_server_extensions(self) -> None:
        self.jpserver_extensions = {SERVER_EXTENSION: True}  # not even one named on the command line
        super().init_server_extensions()

    def load_server_extensions(self) -> None:
        super().load_server_extensions()
        # after every route the extension registered (tornado matches rules in order)
        self.web_app.add_handlers(".*$", [
            (url_path_join(self.base_url, "/?"), ServiceHomeHandler),
            *[(url_path_join(self.base_url, pattern), *rest) for pattern, *rest in
              self.identity_provider.get_handlers()],
            (r"(.*)", NotFoundHandler),
        ])


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
    args = list(sys.argv[1:] if argv is None else argv)
    if os.geteuid() == 0 and "--allow-root" not in args:
        args.append("--allow-root")  # hub services run as the hub's user, often root on a node
    SwapServeServiceApp.launch_instance(argv=[*service_argv(), *args])


# ---- client mode ---------------------------------------------------------------------------
def discover_upstreams(prefix: str = SERVICE_NAME, service_name: str = SERVICE_NAME,
                       environ: dict[str, str] | None = None, timeout: float = 5.0) -> list[tuple[str, str]]:
    """The swap services of the hub's nodes, as (name, URL ending in '/'), for a user's server
    spawned by JupyterHub: every service the hub lists (``GET /hub/api/services``, with the
    server's own token) named ``prefix`` or ``prefix-…`` whose URL the token may read. Where the
    token may not list services, the one service ``service_name`` (``GET /hub/api/services/<name>``).
    Empty without a hub, or when it has none (the server then runs its own engines, as a standalone one)."""
    env = os.environ if environ is None else environ
    api_url, token = env.get("JUPYTERHUB_API_URL"), env.get("JUPYTERHUB_API_TOKEN")
    if not api_url or not token:
        return []
    import httpx

    headers = {"Authorization": f"token {token}"}
    try:
        r = httpx.get(f"{api_url.rstrip('/')}/services", headers=headers, timeout=timeout)
        if r.status_code == 403:  # a server role without list:services: the one service by name
            r = httpx.get(f"{api_url.rstrip('/')}/services/{service_name}", headers=headers, timeout=timeout)
            listed = {service_name: r.json()} if r.status_code == 200 else {}
        else:
            listed = r.json() if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("jupyter-swapserve: the hub at %s did not answer (%s); no shared service", api_url, exc)
        return []
    if r.status_code == 403:
        log.warning("jupyter-swapserve: this server's token may neither list the hub's services nor read '%s' "
                    "(grant the server role list:services and read:services!service=<each node's service>), or "
                    "set SWAPSERVE_UPSTREAM_URL", service_name)
    found = []
    for name in sorted(listed):
        if name != prefix and not name.startswith(prefix + "-"):
            continue
        info = listed[name] if isinstance(listed[name], dict) else {}
        url, path = info.get("url"), info.get("prefix") or f"/services/{name}/"
        if not url:
            log.warning("jupyter-swapserve: the hub lists the service '%s' but this server's token may not read "
                        "its URL (grant the server role read:services!service=%s)", name, name)
            continue
        # the service's own address (what the proxy forwards to), with the prefix it serves under
        found.append((name, url.rstrip("/") + "/" + path.strip("/") + "/"))
    return found


if __name__ == "__main__":  # python -m jupyter_swapserve.hub: the same as `jupyter swapserve`
    main()

"""Who reaches what, with a real JupyterHub (examples/jupyterhub_config.py) and a standalone server.

The matrix: every route the extension registers (read from its route tables: ``handlers()`` for
a standalone server and the service, ``proxy_handlers()`` + ``fallback_handlers()`` for a user's
server in client mode) by every method its handler defines by every identity (none, a wrong token,
a wrong token beside a valid login cookie, another user's token, a token without the access
scope, the service's own hub token, a user, an admin, the cookie alone) by every mode. A route
added later is in the matrix without editing this file.

The crawl: every path that jupyter_server, JupyterLab and the other server extensions installed
here register (read from a real application's router, tests/app_routes.py), and every path the
service's own server registers, asked of the running service through the hub's proxy and on its
own port: none answers anything but a 401/403/404 in JSON, and no answer anywhere carries the
service's hub token (read from the service's process environment)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from tornado.web import RequestHandler

from jupyter_swapserve.handlers import handlers
from jupyter_swapserve.handlers.fallback import fallback_handlers
from jupyter_swapserve.handlers.proxy import proxy_handlers

from .app_routes import expand
from .hub import Hub, hub_available, run_hub
from .server import ROOT, ServerHandle, run_server

pytestmark = pytest.mark.skipif(hub_available() is not None, reason=str(hub_available()))

EMPTY_MODELS = ROOT / "tests" / "models" / "empty.yaml"
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
SERVICE_PREFIX = "/services/swapserve/"
#: the service's credentials at the hub (JupyterHub sets both to the same token; it is also the
#: service's OAuth client secret)
SECRET_VARIABLES = ("JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN")


# ---- the route tables as requests -------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    method: str
    path: str  # below the server's base URL, no leading "/"
    handler: str


def defined_methods(handler: type) -> list[str]:
    return [m for m in METHODS if getattr(handler, m.lower()) is not getattr(RequestHandler, m.lower())]


def owner(table: list[tuple], path: str) -> type:
    """The handler tornado picks for ``path``: the first rule that matches it in full."""
    import re

    return next(rule[1] for rule in table if re.fullmatch(rule[0], path))


def calls_of(table: list[tuple], meanings: list[tuple] | None = None) -> list[Call]:
    """Every path of every rule of ``table`` (one per alternative), with every method that the
    route defines: its own handler's, or in client mode the handler it forwards to
    (``meanings``: the service's table)."""
    out: dict[Call, None] = {}
    for rules in ([meanings] if meanings else []) + [table]:
        for pattern, *_ in rules:
            for path in expand(pattern):
                served_by, meaning = owner(table, path), owner(rules, path)
                for method in defined_methods(meaning):
                    out[Call(method, path.lstrip("/"), served_by.__name__)] = None
    return list(out)


STANDALONE_CALLS = calls_of(handlers())
CLIENT_CALLS = calls_of([*proxy_handlers(), *fallback_handlers()], meanings=handlers())
CALLS = {"standalone": STANDALONE_CALLS, "client": CLIENT_CALLS, "service": STANDALONE_CALLS}


# ---- who asks --------------------------------------------------------------------------------
@dataclass
class Identity:
    expect: str  # "unauthenticated" (401), "refused" (a valid token that may not: 401), "user", "admin",
    # "cookie" (a user by login cookie alone, GETs only)
    base: str  # the server's base URL
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    cookies: httpx.Cookies | None = None


#: per mode, the identities by name (the test ids); built by the `world` fixture
IDENTITIES = {
    "standalone": ["none", "wrong-token", "wrong-bearer+cookie", "wrong-query-token+cookie",
                   "other-scheme+cookie", "token", "cookie"],
    "client": ["none", "wrong-token", "wrong-bearer+cookie", "wrong-query-token+cookie", "other-scheme+cookie",
               "another-users-token", "service-token", "user", "admin", "cookie"],
    "service": ["none", "wrong-token", "wrong-bearer+cookie", "wrong-query-token+cookie", "other-scheme+cookie",
                "token-without-access-scope", "service-token", "user", "admin", "cookie"],
}


def wrong_ones(base: str, cookies: httpx.Cookies) -> dict[str, Identity]:
    return {
        "none": Identity("unauthenticated", base),
        "wrong-token": Identity("unauthenticated", base, {"Authorization": "token not-a-token"}),
        "wrong-bearer+cookie": Identity("unauthenticated", base, {"Authorization": "Bearer not-a-token"},
                                        cookies=cookies),
        "wrong-query-token+cookie": Identity("unauthenticated", base, params={"token": "not-a-token"},
                                             cookies=cookies),
        "other-scheme+cookie": Identity("unauthenticated", base, {"Authorization": "Basic YWxpY2U6eA=="},
                                        cookies=cookies),
    }


@dataclass
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes


class World:
    def __init__(self, hub: Hub, server: ServerHandle) -> None:
        self.hub, self.server = hub, server
        env = hub.service_environ()
        self.secrets = sorted({env[name] for name in SECRET_VARIABLES if env.get(name)})
        assert self.secrets, "the service's environment holds no hub token"
        self.service_token = env["JUPYTERHUB_API_TOKEN"]
        self.alice = hub.browser("alice")
        standalone = httpx.Client(timeout=30)
        r = standalone.get(server.url + "api/status", params={"token": server.token})
        assert r.status_code == 200 and standalone.cookies, "the standalone server set no login cookie"
        r = hub.api("users/alice/tokens", "POST", json={"note": "no access scope", "expires_in": 3600,
                                                        "scopes": ["read:users:name!user=alice"]})
        assert r.status_code == 201, r.text
        scopeless = r.json()["token"]
        client, service = hub.user_url("alice"), hub.service_url()

        def token(value: str) -> dict[str, str]:
            return {"Authorization": f"token {value}"}

        self.identities: dict[str, dict[str, Identity]] = {
            "standalone": {**wrong_ones(server.url, standalone.cookies),
                           "token": Identity("admin", server.url, {"Authorization": f"Bearer {server.token}"}),
                           "cookie": Identity("cookie", server.url, cookies=standalone.cookies)},
            "client": {**wrong_ones(client, self.alice.cookies),
                       "another-users-token": Identity("refused", client, token(hub.tokens["bob"])),
                       "service-token": Identity("refused", client, token(self.service_token)),
                       "user": Identity("user", client, token(hub.tokens["alice"])),
                       # an admin of the service, on their own server (alice's is alice's alone)
                       "admin": Identity("admin", hub.user_url("teacher"), token(hub.tokens["teacher"])),
                       "cookie": Identity("cookie", client, cookies=self.alice.cookies)},
            "service": {**wrong_ones(service, self.alice.cookies),
                        "token-without-access-scope": Identity("refused", service, token(scopeless)),
                        "service-token": Identity("refused", service, token(self.service_token)),
                        "user": Identity("user", service, token(hub.tokens["bob"])),
                        "admin": Identity("admin", service, token(hub.tokens["teacher"])),
                        "cookie": Identity("cookie", service, cookies=self.alice.cookies)},
        }
        for mode, names in IDENTITIES.items():
            assert list(self.identities[mode]) == names, mode
        self._answers: dict[tuple[str, str], dict[Call, Answer]] = {}

    def answers(self, mode: str, name: str) -> dict[Call, Answer]:
        if (mode, name) not in self._answers:
            identity = self.identities[mode][name]
            calls = [c for c in CALLS[mode] if identity.expect != "cookie" or c.method == "GET"]
            with httpx.Client(timeout=60, cookies=identity.cookies) as client:
                self._answers[mode, name] = {call: send(client, identity, call) for call in calls}
        return self._answers[mode, name]

    def leaks(self, answer: Answer) -> list[str]:
        """Where an answer carries one of the service's secrets."""
        found = [f"header {k}" for k, v in answer.headers.multi_items() for s in self.secrets if s in v]
        return found + ["body" for s in self.secrets if s.encode() in answer.body]


def send(client: httpx.Client, identity: Identity, call: Call, base: str | None = None) -> Answer:
    body = b"{}" if call.method in ("POST", "PUT", "PATCH") else None
    with client.stream(call.method, (base or identity.base) + call.path, params=identity.params or None,
                       headers={**identity.headers, "Content-Type": "application/json"}, content=body,
                       follow_redirects=False) as r:
        # an event stream that was granted stays open: its status and headers say enough
        content = b"" if r.headers.get("content-type", "").startswith("text/event-stream") else r.read()
        return Answer(r.status_code, r.headers, content)


def openai_error(answer: Answer) -> dict[str, Any] | None:
    """The answer's OpenAI-shaped error, None when it is not one."""
    if not answer.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        error = json.loads(answer.body).get("error")
    except (ValueError, AttributeError):
        return None
    return error if isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error) else None


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with run_hub(EMPTY_MODELS) as hub, run_server(EMPTY_MODELS) as server:
        for name in ("alice", "bob", "teacher"):
            hub.add_user(name)
        yield World(hub, server)


# ---- the matrix -------------------------------------------------------------------------------
def test_the_route_tables_are_all_in_the_matrix() -> None:
    """The matrix asks every rule of every table (a rule it could not make a path for would be
    missing from it silently)."""
    for table, calls in ((handlers(), STANDALONE_CALLS),
                         ([*proxy_handlers(), *fallback_handlers()], CLIENT_CALLS)):
        for rule in table:
            assert any(call.handler == rule[1].__name__ for call in calls), rule[0]
    assert {c.method for c in STANDALONE_CALLS} >= {"GET", "POST", "PUT", "DELETE"}


@pytest.mark.parametrize(("mode", "name"), [(m, n) for m, names in IDENTITIES.items() for n in names])
def test_route_matrix(world: World, mode: str, name: str) -> None:
    identity = world.identities[mode][name]
    admin = world.answers(mode, "admin" if mode != "standalone" else "token")
    wrong: list[str] = []
    for call, answer in world.answers(mode, name).items():
        error = openai_error(answer)
        what = f"{call.method} {call.path} ({call.handler}): {answer.status} {answer.body[:160]!r}"
        if world.leaks(answer):
            wrong.append(f"{what} carries the service's token in {world.leaks(answer)}")
        if answer.status >= 500 or (answer.status >= 400 and error is None):
            wrong.append(f"{what}: not an OpenAI error")
        elif identity.expect == "unauthenticated" and (answer.status != 401 or error["code"] != "invalid_api_key"):
            wrong.append(f"{what}: expected 401 invalid_api_key")
        elif identity.expect == "refused" and answer.status != 401:
            wrong.append(f"{what}: expected 401")
        elif identity.expect in ("user", "admin", "cookie") and answer.status == 401:
            wrong.append(f"{what}: a valid {name} was refused")
        elif answer.status == 403 and identity.expect in ("user", "cookie") and (
                error["code"] != "forbidden" or admin[call].status == 403):
            wrong.append(f"{what}: forbidden to a user, and to an admin too")
        elif answer.status == 403 and identity.expect == "admin":
            wrong.append(f"{what}: forbidden to an admin")
    assert not wrong, "\n".join(wrong)


def test_a_user_meets_admin_only_routes_as_403(world: World) -> None:
    """The matrix's users are not admins: on the service some routes are refused to them (so the
    user rows above did meet 403s), and each of those is open to the admin."""
    user, admin = world.answers("service", "user"), world.answers("service", "admin")
    forbidden = {c for c, a in user.items() if a.status == 403}
    assert Call("POST", "swapserve/api/models/x/swap-in", "SwapHandler") in forbidden
    assert Call("PUT", "swapserve/api/quotas/x", "UserQuotaHandler") in forbidden
    assert all(admin[c].status != 403 for c in forbidden)


# ---- the browser's login, and what the service's token is -----------------------------------
def test_a_browser_logs_in_to_the_service_through_the_hub(world: World) -> None:
    hub = world.hub
    start = httpx.get(hub.service_url(), timeout=30)  # no login yet: off to the hub's OAuth
    assert start.status_code == 302 and "/hub/api/oauth2/authorize" in start.headers["location"]
    r = world.alice.get(hub.service_url())  # logged in already (hub.browser): straight to the status
    assert r.status_code == 200 and r.url.path == SERVICE_PREFIX + "swapserve/api/status"
    assert r.json()["user"] == {"name": "alice", "admin": False}
    assert not world.leaks(Answer(r.status_code, r.headers, r.content))


def test_the_service_token_lists_user_names_at_the_hub_and_nothing_more(world: World) -> None:
    """docs/security.md: what someone holding the service's token could do. The example grants the
    services one role (swapserve-service: the hub's user names, for the admins' quota form); the
    token identifies the service to the hub, lists names and can do nothing else there. At the
    service itself it is refused on every route (the matrix's "service-token" identity)."""
    hub, header = world.hub, {"Authorization": f"token {world.service_token}"}
    me = httpx.get(hub.url + "hub/api/user", headers=header, timeout=30)
    assert me.status_code == 200 and me.json()["kind"] == "service"
    assert sorted(me.json()["scopes"]) == ["list:users", "read:users:name"]
    users = httpx.get(hub.url + "hub/api/users", headers=header, timeout=30)
    assert users.status_code == 200 and {"alice", "bob"} <= {u["name"] for u in users.json()}
    # names (and the hub's admin flag, which JupyterHub adds to every user model): nothing of a
    # user's servers, groups, roles, activity or auth state comes with them
    assert all(set(u) <= {"name", "kind", "admin", "user_info"} and u.get("user_info") is None
               for u in users.json()), users.json()
    for method, path in [("GET", "hub/api/users/alice/tokens"), ("POST", "hub/api/users/alice/tokens"),
                         ("POST", "hub/api/users/alice/server"), ("DELETE", "hub/api/users/alice/server"),
                         ("GET", "hub/api/services"), ("POST", "hub/api/users"), ("GET", "hub/api/groups")]:
        r = httpx.request(method, hub.url + path, headers=header, json={} if method == "POST" else None, timeout=30)
        assert r.status_code in (403, 404), (method, path, r.status_code, r.text[:200])


# ---- the crawl --------------------------------------------------------------------------------
def registered_paths(kind: str) -> list[tuple[str, str]]:
    """(path, handler) for every pattern a real application of ``kind`` registers, under the
    service's prefix (tests/app_routes.py, in a process of its own)."""
    out = subprocess.run([sys.executable, "-m", "tests.app_routes", kind, SERVICE_PREFIX], cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    routes = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    assert routes, out.stderr[-3000:]
    return [(path, handler) for pattern, handler in routes for path in expand(pattern)[:4]]


@pytest.fixture(scope="module")
def crawl_paths() -> list[str]:
    full, service = registered_paths("full"), registered_paths("service")
    handlers_seen = {h for _, h in full}
    # the crawl really has JupyterLab's and jupyter_server's handlers to ask for
    assert {"jupyterlab_server.settings_handler.SettingsHandler",
            "jupyterlab_server.workspaces_handler.WorkspacesHandler",
            "jupyter_server.services.kernels.handlers.MainKernelHandler",
            "jupyter_server.base.handlers.Template404"} <= handlers_seen
    # the extension's own routes are the matrix's; everything else is crawled
    return sorted({p for p, _ in full + service if not p.startswith(SERVICE_PREFIX + "swapserve")})


#: the two answers of the service that are not errors: its browser login's start and its callback
LOGIN_PATHS = {SERVICE_PREFIX, SERVICE_PREFIX + "oauth_callback"}


def test_nothing_but_the_swap_routes_answers_on_the_service(world: World, crawl_paths: list[str]) -> None:
    hub = world.hub
    direct = f"http://127.0.0.1:{hub.service_port}"
    askers = {"none": world.identities["service"]["none"], "user": world.identities["service"]["user"],
              "admin": world.identities["service"]["admin"], "cookie": world.identities["service"]["cookie"]}
    targets: list[tuple[str, str]] = []  # (base URL, path)
    for path in crawl_paths:
        if path.startswith(SERVICE_PREFIX):
            targets.append((hub.url.rstrip("/"), path))  # through the hub's proxy
            targets.append((direct, "/" + path.removeprefix(SERVICE_PREFIX)))  # the port, outside the prefix
        targets.append((direct, path))  # the service's own port, past the proxy
    wrong: list[str] = []
    asked = 0
    for name, identity in askers.items():
        with httpx.Client(timeout=60, cookies=identity.cookies) as client:
            for base, path in targets:
                for method in ("GET", "POST"):
                    answer = send(client, identity, Call(method, path.lstrip("/"), "?"), base=base + "/")
                    asked += 1
                    what = f"{name} {method} {base}{path}: {answer.status} {answer.body[:120]!r}"
                    if world.leaks(answer):
                        wrong.append(f"{what} carries the service's token in {world.leaks(answer)}")
                    if path in LOGIN_PATHS:  # a redirect (to the hub's OAuth, or to the status), or an error
                        ok = answer.status in (302, 400, 403, 405)
                    else:
                        ok = answer.status in (401, 403, 404) and openai_error(answer) is not None
                    if not ok:
                        wrong.append(what)
    assert asked > 500
    assert not wrong, f"{len(wrong)} of {asked}:\n" + "\n".join(wrong[:60])

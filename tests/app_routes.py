"""The URL patterns a Jupyter server registers, read from a real application's router, and
strings that match them: what tests/test_security.py crawls and requests.

``python -m tests.app_routes full BASE_URL`` builds a ServerApp with every server extension this
environment enables (jupyter_server's services, JupyterLab and its settings and workspaces, the
language servers, terminals, ...: what ``jupyter lab`` would serve there); ``service BASE_URL``
builds the shared service's own server (:class:`jupyter_swapserve.hub.SwapServeServiceApp`, with
stand-in hub variables: nothing contacts a hub while it initializes). Neither is started; each
prints its routes as JSON lines ``[pattern, handler]``, in the order tornado matches them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

try:  # Python >= 3.11
    import re._constants as sre_constants
    import re._parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

C = sre_constants
CANDIDATES = "xa0-_.Z~ "


def _in_class(char: str, items: list[tuple[Any, Any]]) -> bool:
    negate, found = False, False
    for op, av in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            found |= char == chr(av)
        elif op is C.RANGE:
            found |= av[0] <= ord(char) <= av[1]
        elif op is C.CATEGORY:
            found |= {C.CATEGORY_DIGIT: char.isdigit(), C.CATEGORY_NOT_DIGIT: not char.isdigit(),
                      C.CATEGORY_WORD: char.isalnum() or char == "_",
                      C.CATEGORY_NOT_WORD: not (char.isalnum() or char == "_"),
                      C.CATEGORY_SPACE: char.isspace(), C.CATEGORY_NOT_SPACE: not char.isspace()}.get(av, False)
    return found != negate


def expand(pattern: str, limit: int = 12) -> list[str]:
    """Strings ``pattern`` matches in full: every alternative of each alternation, one
    representative for classes and repetitions (a repetition once, or as often as its minimum)."""

    def seq(items: Any) -> list[str]:
        out = [""]
        for op, av in items:
            out = [head + tail for head in out for tail in node(op, av)][:limit]
        return out

    def node(op: Any, av: Any) -> list[str]:
        if op is C.LITERAL:
            return [chr(av)]
        if op is C.NOT_LITERAL:
            return ["x" if chr(av) != "x" else "y"]
        if op is C.ANY:
            return ["x"]
        if op is C.IN:
            return [next(c for c in CANDIDATES if _in_class(c, av))]
        if op in (C.AT, C.ASSERT, C.ASSERT_NOT, C.GROUPREF):
            return [""]
        if op is C.BRANCH:
            return [s for branch in av[1] for s in seq(branch)][:limit]
        if op is C.SUBPATTERN:
            return seq(av[-1])
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", C.MAX_REPEAT)):
            low, high, sub = av
            times = max(low, 1) if high != 0 else 0
            out = [""]
            for _ in range(times):
                out = [head + tail for head in out for tail in seq(sub)][:limit]
            return out
        if op is getattr(C, "ATOMIC_GROUP", None):
            return seq(av)
        raise ValueError(f"no sample for {op} in {pattern!r}")

    import re

    return [s for s in dict.fromkeys(seq(sre_parse.parse(pattern))) if re.fullmatch(pattern, s)]


def _rules(router: Any) -> list[tuple[str, str]]:
    from tornado.routing import PathMatches

    out: list[tuple[str, str]] = []
    for rule in router.rules:
        if hasattr(rule.target, "rules"):
            out.extend(_rules(rule.target))
        elif isinstance(rule.matcher, PathMatches):
            target = rule.target
            out.append((rule.matcher.regex.pattern, f"{target.__module__}.{target.__qualname__}"))
    return out


def app_routes(kind: str, base_url: str) -> list[tuple[str, str]]:
    root = tempfile.mkdtemp(prefix="swapserve-routes-")
    argv = [f"--ServerApp.root_dir={root}", "--SwapServe.quota_db_url=none",
            "--SwapServe.event_log=none", "--SwapServe.export_env=False"]
    if os.geteuid() == 0:
        argv.append("--allow-root")
    if kind == "full":
        from jupyter_server.serverapp import ServerApp

        app = ServerApp()
        app.initialize(argv=[*argv, f"--ServerApp.base_url={base_url}", "--ServerApp.open_browser=False"])
    else:
        os.environ.update({
            "JUPYTERHUB_API_TOKEN": "stand-in", "JUPYTERHUB_CLIENT_ID": "service-swapserve",
            "JUPYTERHUB_API_URL": "http://127.0.0.1:9/hub/api", "JUPYTERHUB_SERVICE_URL": "http://127.0.0.1:0",
            "JUPYTERHUB_SERVICE_PREFIX": base_url, "JUPYTERHUB_SERVICE_NAME": "swapserve",
            "JUPYTERHUB_OAUTH_CALLBACK_URL": base_url + "oauth_callback",
        })
        from jupyter_swapserve.hub import SwapServeServiceApp, service_argv

        app = SwapServeServiceApp()
        app.initialize(argv=[*service_argv(), *argv])
    return _rules(app.web_app.default_router)


if __name__ == "__main__":
    for route in app_routes(sys.argv[1], sys.argv[2]):
        print(json.dumps(route))
    sys.stdout.flush()
    os._exit(0)  # nothing was started; skip the extensions' shutdown hooks

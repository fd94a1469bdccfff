"""The OpenAPI spec describes exactly the routes that are registered (paths and methods), so a
route added without its description fails here, named."""

from __future__ import annotations

import itertools
import re

from jupyter_swapserve.handlers import handlers
from jupyter_swapserve.handlers.base import SwapServeHandler
from jupyter_swapserve.handlers.fallback import NotFoundHandler
from jupyter_swapserve.handlers.openapi import spec

METHODS = ("get", "post", "put", "delete", "patch")
GROUP = re.compile(r"\(([^()]*)\)")


def expand(pattern: str) -> list[str]:
    """A route regex → the OpenAPI paths it serves, parameters as ``{}``: ``(a|b)`` gives one path
    per alternative, any other group is a path parameter."""
    parts = GROUP.split(pattern)  # literal, group, literal, group, ...
    choices: list[list[str]] = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            choices.append([part.replace("\\.", ".")])
        elif re.fullmatch(r"[\w-]+(\|[\w-]+)+", part):
            choices.append(part.split("|"))
        else:
            choices.append(["{}"])
    return ["".join(c) for c in itertools.product(*choices)]


def registered() -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for pattern, cls, *_ in handlers():
        if cls is NotFoundHandler:
            continue
        methods = {m for m in METHODS if getattr(cls, m) is not getattr(SwapServeHandler, m)}
        for path in expand(pattern):
            routes.setdefault(path, set()).update(methods)
    return routes


def described() -> dict[str, set[str]]:
    return {re.sub(r"\{[^}]+\}", "{}", path): set(ops) & set(METHODS) for path, ops in spec()["paths"].items()}


def test_expand() -> None:
    assert expand(r"/swapserve/api/models/([^/]+)/(swap-in|swap-out)") == [
        "/swapserve/api/models/{}/swap-in", "/swapserve/api/models/{}/swap-out"]
    assert expand(r"/swapserve/api/openapi\.json") == ["/swapserve/api/openapi.json"]


def test_every_registered_route_is_in_the_spec() -> None:
    routes, paths = registered(), described()
    missing = sorted(p for p in routes if p not in paths)
    assert not missing, f"routes registered in handlers/__init__.py but missing from handlers/openapi.py: {missing}"
    wrong = {p: (sorted(routes[p]), sorted(paths[p])) for p in routes if routes[p] != paths[p]}
    assert not wrong, f"methods differ, path: (registered, in the spec): {wrong}"


def test_the_spec_describes_no_route_that_does_not_exist() -> None:
    extra = sorted(set(described()) - set(registered()))
    assert not extra, f"paths in handlers/openapi.py that no handler serves: {extra}"


def test_the_spec_is_openapi_3_1_with_resolvable_references_and_errors_everywhere() -> None:
    document = spec("/base/")
    assert document["openapi"] == "3.1.0"
    assert document["servers"] == [{"url": "/base"}]
    assert "servers" not in spec("/")
    text = repr(document)
    for ref in re.findall(r"#/components/schemas/(\w+)", text):
        assert ref in document["components"]["schemas"], ref
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            assert "401" in op["responses"], f"{method.upper()} {path} does not document 401"
            params = set(re.findall(r"\{(\w+)\}", path))
            assert params == {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}, path

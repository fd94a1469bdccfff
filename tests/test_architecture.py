"""The shape of the code, checked mechanically so it stays true (issue 20): the core's rooms stay
small (no class over 350 lines, no function over 60 in service/), no module reaches into another
object's private names anywhere in the package, and service/ imports nothing from Jupyter."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jupyter_swapserve"
SERVICE = PACKAGE / "service"
MAX_CLASS_LINES = 350
MAX_FUNCTION_LINES = 60

#: private names of other libraries that their own protocol makes us use, each with the reason
THIRD_PARTY_PRIVATE = {
    # JupyterHub's HubAuthenticated caches the request's user in this slot, and its identity
    # provider reads and writes it there; ours must use the same slot or the cache splits in two
    ("hub.py", "_jupyterhub_user"),
}


def modules(root: Path) -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(root.rglob("*.py"))]


def lines(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1  # type: ignore[attr-defined,operator]


def private_accesses(path: Path, tree: ast.Module) -> list[str]:
    """``obj._name`` where ``obj`` is not ``self``/``cls``, and ``from <ours> import _name``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if (path.name, node.attr) in THIRD_PARTY_PRIVATE:
                continue
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith(PACKAGE.name)):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: import of {alias.name}")
    return found


def test_no_class_in_the_core_is_over_350_lines_and_no_function_over_60() -> None:
    classes, functions = [], []
    for path, tree in modules(SERVICE):
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and lines(node) > MAX_CLASS_LINES:
                classes.append(f"{path.name}:{node.name} ({lines(node)} lines)")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines(node) > MAX_FUNCTION_LINES:
                functions.append(f"{path.name}:{node.name} ({lines(node)} lines)")
    assert classes == [] and functions == []


def test_no_module_reaches_into_another_objects_private_names() -> None:
    found = [hit for path, tree in modules(PACKAGE) for hit in private_accesses(path, tree)]
    assert found == []


def test_the_checks_see_what_they_are_meant_to_see() -> None:
    """The checker itself, on code that breaks each rule once (so an empty result means something)."""
    sample = PACKAGE / "service" / "sample.py"  # a name inside the package, for the relative path only
    tree = ast.parse("from .scheduler import _rss_gib\n"
                     "class A:\n    def f(self, other):\n        self._ok = other._bad + self.x._bad2\n")
    assert [hit.split(": ", 1)[1] for hit in private_accesses(sample, tree)] == [
        "import of _rss_gib", "other._bad", "self.x._bad2"]


def test_the_core_imports_nothing_from_jupyter() -> None:
    found = []
    for path, tree in modules(SERVICE):
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.name}: {n}" for n in names
                      if n.split(".")[0] in ("jupyter_server", "jupyter_client", "jupyterhub", "tornado", "IPython",
                                             "ipywidgets", "traitlets")]
    assert found == []

"""Which third-party packages a Python package really imports on one code path: a static walk of
module-level imports (what runs at import time), from the entry modules given, through the
package's own modules. Imports inside functions, under ``if TYPE_CHECKING:`` and inside a
``try:`` whose handler catches ImportError are not needed to import (the last are listed as
optional). Used to decide which of vLLM's Requires-Dist must travel to the GPU machine.

    python bench/gpu/import_closure.py SITE_DIR vllm vllm.entrypoints.cli.main ...
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def module_file(root: Path, name: str) -> Path | None:
    parts = name.split(".")
    base = root.joinpath(*parts)
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    if base.with_suffix(".py").exists():
        return base.with_suffix(".py")
    return None


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def catches_import_error(node: ast.Try) -> bool:
    for h in node.handlers:
        if h.type is None:
            return True
        names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
        for n in names:
            if isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception"):
                return True
    return False


def imports(tree: ast.Module, modname: str, is_pkg: bool) -> list[tuple[str, list[str], str]]:
    """(module, imported names, how) for each import run at import time; how is "required",
    "conditional" (under an ``if``: read the condition) or "optional" (ImportError caught)."""
    out: list[tuple[str, list[str], str]] = []

    def walk(body: list[ast.stmt], optional: str) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend((a.name, [], optional) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = modname.split(".") if is_pkg else modname.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                out.append((base, [a.name for a in node.names], optional))
            elif isinstance(node, ast.If):
                weaker = "optional" if optional == "optional" else "conditional"
                if not is_type_checking(node.test):
                    walk(node.body, weaker)
                walk(node.orelse, weaker)
            elif isinstance(node, ast.Try):
                walk(node.body, "optional" if catches_import_error(node) else optional)
                walk(node.finalbody, optional)
                for h in node.handlers:
                    walk(h.body, "optional")
            elif isinstance(node, ast.With):  # contextlib.suppress(ImportError) and the like
                suppress = any("suppress" in ast.unparse(i.context_expr) for i in node.items)
                walk(node.body, "optional" if suppress else optional)
    walk(tree.body, "required")
    return out


RANK = {"required": 0, "conditional": 1, "optional": 2}
NAMES = {v: k for k, v in RANK.items()}


def closure(root: Path, package: str, entries: list[str]) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """{third-party top-level name: (how, an importing module)}, and how each of the package's
    modules is reached. How a thing is reached is the weakest link on its strongest path: a
    module imported only under an ``if`` makes everything it imports conditional."""
    found: dict[str, tuple[str, str]] = {}
    reach: dict[str, int] = {}
    todo: list[tuple[int, str]] = [(0, e) for e in entries]
    parsed: dict[str, list[tuple[str, list[str], str]] | None] = {}
    while todo:
        todo.sort()
        rank, name = todo.pop(0)
        if name in reach and reach[name] <= rank:
            continue
        reach[name] = rank
        parts = name.split(".")
        todo.extend((rank, ".".join(parts[:i])) for i in range(1, len(parts)))  # parents run first
        if name not in parsed:
            path = module_file(root, name)
            parsed[name] = None if path is None else imports(
                ast.parse(path.read_text(errors="replace")), name, path.name == "__init__.py")
        for mod, names, how in parsed[name] or []:
            r = max(rank, RANK[how])
            top = mod.split(".")[0]
            if top == package:
                todo.append((r, mod))
                todo.extend((r, f"{mod}.{n}") for n in names if module_file(root, f"{mod}.{n}"))
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                if top not in found or r < RANK[found[top][0]]:
                    found[top] = (NAMES[r], name)
    return found, {m: NAMES[r] for m, r in reach.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("site", type=Path)
    p.add_argument("package")
    p.add_argument("entries", nargs="+")
    args = p.parse_args()
    found, seen = closure(args.site, args.package, args.entries)
    print(f"# {sum(1 for h in seen.values() if h == 'required')} modules of {args.package} imported for sure, "
          f"{len(seen)} walked")
    for top, (how, where) in sorted(found.items(), key=lambda kv: (RANK[kv[1][0]], kv[0])):
        print(f"{how:12s} {top:34s} {where}")


if __name__ == "__main__":
    main()

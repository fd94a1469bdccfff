"""Which third-party packages a Python package really imports on one code path: a static walk of
what runs at import time, from the entry modules given, through the package's own modules. Used to
decide which of vLLM's Requires-Dist must travel to the GPU machine.

What counts as run at import time:
- module-level imports; imports inside functions, under ``if TYPE_CHECKING:`` and inside a ``try:``
  whose handler catches ImportError are not needed to import (the last are listed as optional);
- lazy modules (``xgr = LazyLoader("xgr", globals(), "xgrammar")``, vLLM's and TensorFlow's idiom)
  wherever an attribute of one is evaluated at import time: a class body (a dataclass field's
  annotation ``matcher: xgr.GrammarMatcher``), a decorator, a default, a base class, a function's
  annotations (without ``from __future__ import annotations`` every one of these is evaluated when
  the module is imported). The H200 run of 2026-12-02 found llguidance, xgrammar and outlines_core
  this way, on the device, one failed start at a time; the walk now finds them here.

``--wheels DIR`` also follows the packages found into their own wheels' ``Requires-Dist`` (xgrammar
needs apache-tvm-ffi, which vLLM never names), and lists what none of the wheels in DIR and none of
the packages in ``--have FILE`` (the device's, one name a line: bench/gpu/device-packages.txt) provides,
and each import the walk found required that neither provides; ``--check`` fails on either (stage.sh).

    python bench/gpu/import_closure.py SITE_DIR vllm vllm.entrypoints.cli.main ... \\
        [--wheels .stage/build/deps] [--have bench/gpu/device-packages.txt]
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import zipfile
from pathlib import Path

LAZY_LOADERS = ("LazyLoader", "lazy_import")


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


def lazy_module(value: ast.expr) -> str | None:
    """The module a lazy-loader call names (its last string argument), or None."""
    if not isinstance(value, ast.Call):
        return None
    func = value.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    if name not in LAZY_LOADERS:
        return None
    strings = [a.value for a in value.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return strings[-1] if strings else None


def evaluated(node: ast.AST) -> list[ast.AST]:
    """The expressions of a statement evaluated when it runs: not the bodies of the functions and
    lambdas it defines (run only when called)."""
    out: list[ast.AST] = []
    todo = [node]
    while todo:
        n = todo.pop()
        if isinstance(n, ast.Lambda):
            todo.extend(d for d in n.args.defaults + n.args.kw_defaults if d is not None)
            continue
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue  # walk() reads definitions itself
        out.append(n)
        todo.extend(ast.iter_child_nodes(n))
    return out


def imports(tree: ast.Module, modname: str, is_pkg: bool) -> list[tuple[str, list[str], str, bool]]:
    """(module, imported names, how, lazy) for each import run at import time; how is "required",
    "conditional" (under an ``if``: read the condition) or "optional" (ImportError caught); lazy:
    a lazy module whose attribute is evaluated at import time."""
    out: list[tuple[str, list[str], str, bool]] = []
    future_annotations = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
                             and any(a.name == "annotations" for a in n.names) for n in tree.body)
    lazy: dict[str, str] = {}

    def uses(nodes: list[ast.AST | None], optional: str) -> None:
        """Attributes of lazy modules among the expressions ``nodes`` (evaluated now)."""
        for node in nodes:
            if node is None:
                continue
            for n in evaluated(node):
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in lazy:
                    out.append((lazy[n.value.id], [], optional, True))

    def signature(node: ast.FunctionDef | ast.AsyncFunctionDef, optional: str) -> None:
        a = node.args
        parts: list[ast.AST | None] = [*node.decorator_list, *a.defaults, *a.kw_defaults]
        if not future_annotations:
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
            parts += [p.annotation for p in params if p is not None] + [node.returns]
        uses(parts, optional)

    def walk(body: list[ast.stmt], optional: str, in_class: bool = False) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                out.extend((a.name, [], optional, False) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = modname.split(".") if is_pkg else modname.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                out.append((base, [a.name for a in node.names], optional, False))
            elif isinstance(node, ast.If):
                weaker = "optional" if optional == "optional" else "conditional"
                uses([node.test], optional)
                if is_type_checking(node.test):
                    walk(node.orelse, optional, in_class)  # what runs when not type checking: always
                else:
                    walk(node.body, weaker, in_class)
                    walk(node.orelse, weaker, in_class)
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
                uses([node.test if isinstance(node, ast.While) else node.iter], optional)
                walk(node.body, optional, in_class)
                walk(node.orelse, optional, in_class)
            elif isinstance(node, ast.Try):
                walk(node.body, "optional" if catches_import_error(node) else optional, in_class)
                walk(node.finalbody, optional, in_class)
                for h in node.handlers:
                    walk(h.body, "optional", in_class)
            elif isinstance(node, ast.With):  # contextlib.suppress(ImportError) and the like
                suppress = any("suppress" in ast.unparse(i.context_expr) for i in node.items)
                walk(node.body, "optional" if suppress else optional, in_class)
            elif isinstance(node, ast.ClassDef):  # its body runs when the module is imported
                uses([*node.decorator_list, *node.bases, *node.keywords], optional)
                walk(node.body, optional, in_class=True)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                signature(node, optional)
            elif isinstance(node, ast.AnnAssign):
                uses([node.value] + ([] if future_annotations else [node.annotation]), optional)
            else:
                if (isinstance(node, ast.Assign) and not in_class and (module := lazy_module(node.value))
                        and all(isinstance(t, ast.Name) for t in node.targets)):
                    lazy.update((t.id, module) for t in node.targets if isinstance(t, ast.Name))
                    continue
                uses([node], optional)
    walk(tree.body, "required")
    return out


RANK = {"required": 0, "conditional": 1, "optional": 2}
NAMES = {v: k for k, v in RANK.items()}


def closure(root: Path, package: str, entries: list[str]) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """{third-party top-level name: (how, an importing module)}, and how each of the package's
    modules is reached. How a thing is reached is the weakest link on its strongest path: a
    module imported only under an ``if`` makes everything it imports conditional. A lazy module
    reached only through an attribute at import time names its importer with "(lazy)"."""
    found: dict[str, tuple[str, str]] = {}
    reach: dict[str, int] = {}
    todo: list[tuple[int, str]] = [(0, e) for e in entries]
    parsed: dict[str, list[tuple[str, list[str], str, bool]] | None] = {}
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
        for mod, names, how, lazy in parsed[name] or []:
            r = max(rank, RANK[how])
            top = mod.split(".")[0]
            if top == package:
                todo.append((r, mod))
                todo.extend((r, f"{mod}.{n}") for n in names if module_file(root, f"{mod}.{n}"))
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                if top not in found or r < RANK[found[top][0]]:
                    found[top] = (NAMES[r], name + (" (lazy)" if lazy else ""))
    return found, {m: NAMES[r] for m, r in reach.items()}


# ---- the found packages' own requirements ------------------------------------------------------------------

def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class Wheel:
    """A wheel's distribution name, the top-level import names it provides, its unconditional
    requirements (no extras; markers evaluated for CPython 3.12 on x86-64 Linux)."""

    def __init__(self, path: Path) -> None:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
            meta = z.read(f"{info}/METADATA").decode(errors="replace")
            tops = (z.read(f"{info}/top_level.txt").decode().split() if f"{info}/top_level.txt" in names else [])
        self.path = path
        self.name = normalize(next(line[6:].strip() for line in meta.splitlines() if line.startswith("Name: ")))
        self.tops = set(tops) or {n.split("/")[0].removesuffix(".py") for n in names
                                  if not n.split("/")[0].endswith((".dist-info", ".data"))}
        self.requires = [r for line in meta.splitlines() if line.startswith("Requires-Dist: ")
                         if (r := requirement(line[len("Requires-Dist: "):]))]


DEVICE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def requirement(spec: str) -> str | None:
    """The distribution a Requires-Dist line needs on the device, or None (an extra's, or a marker
    that is false there)."""
    from packaging.requirements import Requirement

    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate(DEVICE_ENV):
        return None
    return normalize(req.name)


def needs(found: dict[str, tuple[str, str]], wheels: list[Wheel], have: set[str]
          ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """{wheel providing a found package: its requirements}, followed through the wheels; and
    {requirement no wheel and nothing on the device provides: who needs it}."""
    by_top = {t: w for w in wheels for t in w.tops}
    by_name = {w.name: w for w in wheels}
    todo = [by_top[t] for t, (how, _) in found.items() if how != "optional" and t in by_top]
    seen: dict[str, list[str]] = {}
    missing: dict[str, str] = {}
    while todo:
        w = todo.pop()
        if w.name in seen:
            continue
        seen[w.name] = w.requires
        for r in w.requires:
            if r in by_name:
                todo.append(by_name[r])
            elif r not in have:
                missing.setdefault(r, w.name)
    return seen, missing


# import names whose distribution is named otherwise (the device list names distributions)
ALIASES = {"PIL": "pillow", "yaml": "pyyaml", "zmq": "pyzmq", "cpuinfo": "py-cpuinfo", "cv2": "opencv-python-headless",
           "google": "protobuf", "sklearn": "scikit-learn", "attr": "attrs", "dateutil": "python-dateutil"}


def unprovided(found: dict[str, tuple[str, str]], wheels: list[Wheel], have: set[str]) -> dict[str, str]:
    """{required import: its importer} that no wheel provides and the device does not have."""
    tops = {t for w in wheels for t in w.tops}
    return {top: where for top, (how, where) in found.items()
            if how == "required" and top not in tops and normalize(ALIASES.get(top, top)) not in have}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("site", type=Path)
    p.add_argument("package")
    p.add_argument("entries", nargs="+")
    p.add_argument("--wheels", type=Path, action="append", default=[], help="folders of wheels to follow into")
    p.add_argument("--have", type=Path, help="the device's distributions, one name a line")
    p.add_argument("--check", action="store_true", help="exit 1 when something required is provided by neither")
    args = p.parse_args()
    found, seen = closure(args.site, args.package, args.entries)
    print(f"# {sum(1 for h in seen.values() if h == 'required')} modules of {args.package} imported for sure, "
          f"{len(seen)} walked")
    for top, (how, where) in sorted(found.items(), key=lambda kv: (RANK[kv[1][0]], kv[0])):
        print(f"{how:12s} {top:34s} {where}")
    if args.wheels:
        wheels = [Wheel(w) for d in args.wheels for w in sorted(d.glob("*.whl"))]
        have = set() if args.have is None else {normalize(n) for n in args.have.read_text().split()
                                                if not n.startswith("#")}
        requires, missing = needs(found, wheels, have)
        print(f"# requirements of the {len(requires)} wheels those imports reach")
        for name, reqs in sorted(requires.items()):
            print(f"needs        {name:34s} {', '.join(reqs) or '-'}")
        for name, who in sorted(missing.items()):
            print(f"MISSING      {name:34s} needed by {who}")
        lacking = unprovided(found, wheels, have)
        for top, where in sorted(lacking.items()):
            print(f"UNPROVIDED   {top:34s} imported by {where}")
        if args.check and (missing or lacking):
            sys.exit(1)


if __name__ == "__main__":
    main()

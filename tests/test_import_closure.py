"""bench/gpu/import_closure.py, the walk that decides which of vLLM's imports travel to the GPU machine:
it must find what a failed start on the device found (2026-12-02: llguidance, xgrammar through lazy
modules used in dataclass annotations; apache-tvm-ffi, which only xgrammar's wheel names), and only that."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def closure_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("import_closure", ROOT / "bench" / "gpu" / "import_closure.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_closure"] = module  # dataclasses and the like look their module up
    spec.loader.exec_module(module)
    return module


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


PACKAGE = {
    "pkg/__init__.py": "from pkg import grammar, later\n",
    "pkg/lazy.py": "class LazyLoader:\n    pass\n",
    "pkg/grammar.py": """
        from dataclasses import dataclass
        from typing import TYPE_CHECKING
        from pkg.lazy import LazyLoader
        import eager_needed
        if TYPE_CHECKING:
            import typing_only
        else:
            xgr = LazyLoader("xgr", globals(), "lazy_in_annotation")
            dflt = LazyLoader("dflt", globals(), "lazy_in_default")
            deco = LazyLoader("deco", globals(), "lazy_in_decorator")
            body = LazyLoader("body", globals(), "lazy_in_function_body")
            never = LazyLoader("never", globals(), "lazy_never_touched")

        @dataclass
        class Grammar:
            matcher: xgr.GrammarMatcher  # evaluated when the class is defined

        def compile(x=dflt.DEFAULT):
            return body.compile(x)

        @deco.register
        def registered():
            pass
        """,
    "pkg/later.py": """
        from __future__ import annotations
        from dataclasses import dataclass
        from pkg.lazy import LazyLoader
        oc = LazyLoader("oc", globals(), "lazy_postponed")

        @dataclass
        class Guide:
            guide: oc.Guide  # a string under postponed annotations: never evaluated at import
        """,
}


def test_lazy_modules_used_at_import_time_are_required(tmp_path: Path, closure_tool: ModuleType) -> None:
    write(tmp_path, PACKAGE)
    found, _ = closure_tool.closure(tmp_path, "pkg", ["pkg"])
    required = {top: where for top, (how, where) in found.items() if how == "required"}
    assert required == {"eager_needed": "pkg.grammar", "lazy_in_annotation": "pkg.grammar (lazy)",
                        "lazy_in_default": "pkg.grammar (lazy)", "lazy_in_decorator": "pkg.grammar (lazy)"}
    # run only when called, only for the type checker, never touched, or a postponed annotation
    for name in ("lazy_in_function_body", "typing_only", "lazy_never_touched", "lazy_postponed"):
        assert name not in found


def wheel(folder: Path, dist: str, top: str, requires: list[str]) -> Path:
    path = folder / f"{dist.replace('-', '_')}-1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: " + dist + "\nVersion: 1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{top}/__init__.py", "")
        z.writestr(f"{dist.replace('-', '_')}-1.0.dist-info/METADATA", meta)
    return path


def test_requirements_are_followed_into_the_wheels(tmp_path: Path, closure_tool: ModuleType) -> None:
    write(tmp_path / "site", PACKAGE)
    found, _ = closure_tool.closure(tmp_path / "site", "pkg", ["pkg"])
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel(wheels, "lazy-in-annotation", "lazy_in_annotation",
          ["tvm-ffi>=0.1", "torch", "pytest; extra == 'test'", "appnope; sys_platform == 'darwin'"])
    wheel(wheels, "tvm-ffi", "tvm_ffi", ["typing_extensions>=4"])
    found_wheels = [closure_tool.Wheel(w) for w in wheels.glob("*.whl")]
    requires, missing = closure_tool.needs(found, found_wheels, have={"torch"})
    assert requires == {"lazy-in-annotation": ["tvm-ffi", "torch"], "tvm-ffi": ["typing-extensions"]}
    # neither a wheel here nor on the device: named, with who needs it; an extra's and another platform's are not
    assert missing == {"typing-extensions": "tvm-ffi"}
    # what the walk requires that no wheel provides and the device lacks: what stage.sh refuses to stage without
    assert closure_tool.unprovided(found, found_wheels, have={"eager-needed"}) == {
        "lazy_in_default": "pkg.grammar (lazy)", "lazy_in_decorator": "pkg.grammar (lazy)"}

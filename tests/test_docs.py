"""The documentation stays true: the generated configuration reference matches the code, and every
relative link in the README and docs/ points at a file that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "python scripts/gen_config_docs.py"


def test_configuration_reference_matches_schema_and_traits() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert check.returncode == 0, (
        f"docs/configuration.md has drifted from the schema or the SwapServe options. Regenerate it with:\n"
        f"    {REGENERATE}\n{check.stderr}"
    )


def test_configuration_reference_names_every_schema_field_and_option() -> None:
    import json

    from jupyter_swapserve.app import SwapServe

    text = (ROOT / "docs" / "configuration.md").read_text()
    schema = json.loads((ROOT / "jupyter_swapserve" / "schema" / "models.schema.json").read_text())
    for name in schema["$defs"]["model"]["properties"]:
        assert f"| `{name}` |" in text, f"model field {name} missing; run {REGENERATE}"
    for name in SwapServe.class_traits(config=True):
        if name in SwapServe.__dict__:
            assert f"`c.SwapServe.{name}`" in text, f"option {name} missing; run {REGENERATE}"


LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_in_readme_and_docs_resolve() -> None:
    broken: list[str] = []
    for doc in _documents():
        for target in LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} → {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_setup_commands_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert f"bash {script}" in readme
        assert (ROOT / script).exists()


def test_troubleshooting_messages_are_ones_the_code_emits() -> None:
    """Each error quoted in docs/troubleshooting.md (as a `> ` block quote) occurs in the sources,
    so a reworded message sends users nowhere only until this test runs."""
    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    quoted = [line[2:].strip().strip("`") for line in doc.splitlines() if line.startswith("> `")]
    assert quoted, "docs/troubleshooting.md quotes no error messages"
    sources = "\n".join(p.read_text() for p in (ROOT / "jupyter_swapserve").rglob("*.py"))
    missing = [q for q in quoted if q not in sources]
    assert not missing, "quoted in docs/troubleshooting.md but not found in jupyter_swapserve/:\n" + "\n".join(missing)

"""The example notebooks run top to bottom in a real kernel started by the real server."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from .server import ServerHandle
from .test_magics import ServerKernel

pytestmark = pytest.mark.engines
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_notebook_runs_without_errors(demo_server: ServerHandle) -> None:
    nb = nbformat.read(EXAMPLES / "01-quickstart.ipynb", as_version=4)
    kernel = ServerKernel(demo_server)
    outputs: list[str] = []
    try:
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            run = kernel.run(cell.source)
            assert run.ok, f"cell failed: {cell.source!r}: {run.error or run.stderr}"
            outputs.append(run.plain() + "\n" + run.stdout)
    finally:
        kernel.shutdown()
    text = "\n".join(outputs)
    assert "gemma" in text and "smollm2" in text  # %llm list
    assert "Paris" in text  # smollm2's answer
    assert "swapped in" in text  # gemma was swapped in for its completion, and said so
    assert "swap-in seconds:" in text  # the openai client cell
    assert demo_server.model("smollm2")["state"] == "swapped_out"  # %llm swap-out

"""The example notebooks run top to bottom in a real kernel started by the real demo server, from
examples/ as JupyterLab runs them, and say what they promise; and unchanged in a kernel the server
did not start (nbclient, as `jupyter nbconvert --execute` runs them)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nbformat
import pytest

from .server import ServerHandle
from .test_magics import Run, ServerKernel

pytestmark = pytest.mark.engines
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass
class NotebookRun:
    runs: list[Run] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(r.plain() + "\n" + r.stdout for r in self.runs)

    def images(self) -> int:
        return sum(1 for r in self.runs for _, _, data in r.displays() if "image/png" in data)


def run_notebook(server: ServerHandle, name: str) -> NotebookRun:
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: outputs are committed"
    kernel = ServerKernel(server)
    result = NotebookRun()
    try:
        # JupyterLab starts a notebook's kernel in the notebook's folder
        assert kernel.run(f"import os; os.chdir({str(EXAMPLES)!r})").ok
        assert kernel.run("%matplotlib inline").ok
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            run = kernel.run(cell.source)
            assert run.ok, f"{name}: cell failed: {cell.source!r}: {run.error or run.stderr}"
            result.runs.append(run)
    finally:
        kernel.shutdown()
    return result


def test_quickstart_notebook_runs_without_errors(demo_server: ServerHandle) -> None:
    text = run_notebook(demo_server, "01-quickstart.ipynb").text
    assert "gemma" in text and "smollm2" in text  # %llm list
    assert "Paris" in text  # smollm2's answer
    assert "swapped in" in text  # gemma was swapped in for its completion, and said so
    assert "swap-in seconds:" in text  # the openai client cell
    assert demo_server.model("smollm2")["state"] == "swapped_out"  # %llm swap-out


def test_openai_client_notebook_streams_swaps_and_runs_concurrently(demo_server: ServerHandle) -> None:
    before = {m["name"]: m["swaps_in"] for m in demo_server.status()["models"]}
    text = run_notebook(demo_server, "02-openai-client.ipynb").text
    assert "'engine': 'llamacpp'" in text  # the models list with the swapserve extension
    chunks = int(text.split("chunks:")[1].split()[0])
    assert chunks > 1  # streamed, not one block
    # gemma, smollm2, gemma on a device with room for one: the second and third swapped, and the headers said so
    header_lines = [line for line in text.splitlines() if "swap-in" in line and ": '" in line]
    assert any(float(line.split("swap-in")[1].split()[0]) > 0 for line in header_lines), header_lines
    assert "6 answers in" in text  # asyncio.gather over both models
    after = {m["name"]: m["swaps_in"] for m in demo_server.status()["models"]}
    assert sum(after.values()) - sum(before.values()) >= 2
    assert "(virtual)" in text and "last steps:" in text  # the status route's devices and steps


def test_admin_quotas_notebook_sets_hits_reads_and_removes_a_quota(demo_server: ServerHandle) -> None:
    me = demo_server.status()["user"]["name"]
    try:
        text = run_notebook(demo_server, "03-admin-quotas.ipynb").text
    finally:  # the demo server is shared by the session: never leave a quota behind
        httpx.delete(demo_server.url + f"swapserve/api/quotas/{me}", headers=demo_server.headers(), timeout=30)
    assert "'admin': True" in text
    assert "403 model_not_allowed" in text
    assert "400 max_tokens_exceeded max_tokens" in text
    assert "served:" in text
    assert "429 insufficient_quota" in text and "Retry-After:" in text
    assert "remaining:" in text and "'tokens_today': 0" in text
    assert "'deleted': True}" in text and "gemma again:" in text
    quotas = httpx.get(demo_server.url + "swapserve/api/quotas", headers=demo_server.headers(), timeout=30).json()
    assert [row["user"] for row in quotas["quotas"]] == ["*"]  # the notebook removed its row itself


def test_swap_benchmark_notebook_plots_the_committed_results(demo_server: ServerHandle) -> None:
    results = EXAMPLES.parent / "bench" / "results"
    nb = run_notebook(demo_server, "04-swap-benchmark.ipynb")
    swap_runs = [p for p in results.glob("*swap_latency.json") if json.loads(p.read_text()).get("models")]
    contention = list(results.glob("*contention.json"))
    assert swap_runs, "bench/results has no swap-latency results to plot"
    # swap vs cold start, beside the paper, and contention when its results exist
    assert nb.images() == 2 + (1 if contention else 0)
    assert "cold start" in nb.text and "faster than vLLM's cold start" in nb.text
    if not contention:
        assert "no contention results yet" in nb.text


def run_elsewhere(server: ServerHandle, name: str, tmp_path: Path) -> str:
    """Run a notebook as ``jupyter nbconvert --execute`` does: nbclient starts its own kernel, which
    inherits nothing from the server. The kernel sees only the server's entry in a Jupyter runtime
    directory of its own (the machine's is shared with other servers)."""
    from jupyter_core.paths import jupyter_runtime_dir
    from nbclient import NotebookClient

    runtime = tmp_path / "runtime"
    runtime.mkdir()
    entry = Path(jupyter_runtime_dir()) / f"jpserver-{server.proc.pid}.json"
    (runtime / entry.name).write_text(entry.read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SWAPSERVE_", "JUPYTERHUB_"))}
    env["JUPYTER_RUNTIME_DIR"] = str(runtime)
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        'import os\nassert "SWAPSERVE_URL" not in os.environ and "SWAPSERVE_TOKEN" not in os.environ'))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
                   ).execute(env=env)
    return "\n".join(out.get("text", "") + out.get("data", {}).get("text/plain", "")
                     for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def test_the_quickstart_runs_unchanged_in_a_kernel_the_server_did_not_start(
        demo_server: ServerHandle, tmp_path: Path) -> None:
    text = run_elsewhere(demo_server, "01-quickstart.ipynb", tmp_path)
    assert "Paris" in text and "swap-in seconds:" in text  # %%llm and openai_client() both found it


def test_the_openai_notebook_runs_unchanged_in_a_kernel_the_server_did_not_start(
        demo_server: ServerHandle, tmp_path: Path) -> None:
    text = run_elsewhere(demo_server, "02-openai-client.ipynb", tmp_path)
    assert f"{demo_server.url}swapserve/v1" in text  # client.base_url: the server from the runtime directory
    assert "6 answers in" in text and "last steps:" in text  # async_openai_client() and connection()

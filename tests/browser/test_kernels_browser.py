"""A notebook kernel as a GPU tenant, as a JupyterLab user sees it in a real browser: the kernel
appears in the sidebar's "Kernels on the GPU" section; Release swaps it out; the next cell run from
the notebook first restores it and shows one status line above its output, and the notebook's
variables are still there. On the virtual device (kernels counted by host memory) a kernel's swap
moves nothing, so this shows what the user sees, not that a swap keeps a kernel's state: that claim
is tests/gpu/test_gpu_kernels.py's, on a real GPU (docs/testing.md).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from ..server import ROOT, ServerHandle, run_server
from .test_sidebar import PANEL, TAB, browser, screenshot  # noqa: F401 (fixtures)

pytestmark = pytest.mark.engines
NOTEBOOK = "tenant.ipynb"


@pytest.fixture(scope="module")
def lab_kernels() -> Iterator[ServerHandle]:
    home = Path(tempfile.mkdtemp(prefix="swapserve-lab-kernels-"))
    env = {"JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    notification = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text('{"fetchNews": "false", "checkForUpdates": false}')
    args = ["--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--SwapServe.kernel_tenants_on_virtual_device=True", "--SwapServe.kernel_check_interval=0.3"]
    with run_server(ROOT / "tests" / "models" / "empty.yaml", lab=True, env=env, extra_args=args) as server:
        cells = [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": src}
                 for src in ("answer = 6 * 7\nprint(answer)", "print(answer + 1)")]
        notebook = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
                    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}
        r = httpx.put(f"{server.url}api/contents/{NOTEBOOK}", headers=server.headers(), timeout=30,
                      json={"type": "notebook", "format": "json", "content": notebook})
        assert r.status_code in (200, 201), r.text
        # the notebook's session and kernel exist before the page opens it (no kernel picker)
        r = httpx.post(f"{server.url}api/sessions", headers=server.headers(), timeout=60,
                       json={"path": NOTEBOOK, "name": NOTEBOOK, "type": "notebook", "kernel": {"name": "python3"}})
        assert r.status_code == 201, r.text
        yield server


def dismiss_kernel_dialog(page: Page) -> None:
    """JupyterLab sometimes asks for a kernel although the notebook's session has one (it looked
    before the sessions were listed): accept its choice, the notebook's python3."""
    dialog = page.locator(".jp-Dialog")
    if dialog.count() and dialog.first.is_visible():
        print(f"dialog: {dialog.first.inner_text()[:200]!r}")
        dialog.first.locator(".jp-mod-accept").click()
        expect(dialog).to_have_count(0)


def run_cell(page: Page, index: int) -> None:
    """Shift+Enter in the cell, as a user does; again if the key went nowhere (the notebook was still
    taking focus): the cell's prompt leaves "[ ]:" once it is queued or run."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputPrompt")
    for _ in range(3):
        dismiss_kernel_dialog(page)
        cell.locator(".cm-content").click()
        expect(cell).to_have_class(re.compile(r"\bjp-mod-active\b"))
        page.keyboard.press("Shift+Enter")
        try:
            expect(prompt).not_to_have_text(re.compile(r"^\s*\[ \]:\s*$"), timeout=10_000)
            return
        except AssertionError:
            continue
    pytest.fail(f"cell {index} did not run after three Shift+Enter")


def test_a_kernel_released_in_the_sidebar_is_restored_before_its_next_cell(
        lab_kernels: ServerHandle, browser: Browser) -> None:  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(60_000)
    page.goto(f"{lab_kernels.url}lab/tree/{NOTEBOOK}?token={lab_kernels.token}")
    expect(page.locator(".jp-Notebook .jp-Cell")).to_have_count(2, timeout=90_000)
    page.wait_for_timeout(500)  # a kernel dialog, if JupyterLab shows one, comes right after the cells
    dismiss_kernel_dialog(page)
    expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_be_attached(timeout=90_000)
    run_cell(page, 0)
    first = page.locator(".jp-Notebook .jp-Cell").nth(0).locator(".jp-OutputArea")
    expect(first).to_contain_text("42", timeout=60_000)

    if not page.locator(PANEL).is_visible():
        page.click(TAB)
    section = page.locator(f"{PANEL} .jp-SwapServe-kernels")
    item = section.locator("li[data-kernel]").filter(has_text=NOTEBOOK)
    expect(item).to_be_visible(timeout=30_000)  # the kernel is a tenant, named by its notebook
    expect(item.locator(".jp-SwapServe-state")).to_have_text("resident")
    item.get_by_role("button", name=f"Release the GPU memory of {NOTEBOOK}").click()
    expect(section.locator(".jp-SwapServe-kernelMessage")).to_contain_text("will be swapped out")
    expect(item.locator(".jp-SwapServe-state")).to_have_text("swapped out", timeout=30_000)
    kernel_id = item.get_attribute("data-kernel")
    screenshot(page, "sidebar-kernels.png")

    run_cell(page, 1)
    second = page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-OutputArea")
    expect(second).to_contain_text("43", timeout=60_000)
    text = second.inner_text()
    assert text.index("GPU state restored in ") < text.index("43"), text  # the line comes first
    expect(item.locator(".jp-SwapServe-state")).to_have_text("resident", timeout=30_000)
    state = httpx.get(f"{lab_kernels.url}swapserve/api/kernels/{kernel_id}", headers=lab_kernels.headers(),
                      timeout=30).json()
    assert state["swaps_out"] == 1 and state["swaps_in"] == 1, json.dumps(state)
    page.close()

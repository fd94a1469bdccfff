"""The sidebar across two GPU nodes, in a real browser: the hub of tests/test_nodes.py (a real
JupyterHub, two swap services "swapserve-gpu1" and "swapserve-gpu2" as external hub services, each
its own virtual device and models, smollm2 on both, one real PostgreSQL), Debian's Chromium logged
in through the hub's login page, each user's sidebar reaching both nodes through their own server
in client mode.

What a person relies on: every node's models are there, each saying which node serves it (smollm2
twice, once per node, neither card overwriting the other), the devices of both nodes, a strip of
the nodes; a swap button and "Use now" act on the node of their card and on no other; a model the
user's quota does not include is not offered, with the reason in one line, and the service refuses
the hint for it too. The two-node view is photographed for docs/ (sidebar-nodes.png)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from ..hub import Hub, hub_available
from ..postgres import postgres_available
from ..test_nodes import hub, on, status_via, wait_for  # noqa: F401 (the fixture: two nodes, one PostgreSQL)
from .test_sidebar import PANEL, browser, screenshot  # noqa: F401 (fixtures)
from .test_sidebar_hub import lab_as

GPU1, GPU2 = "swapserve-gpu1", "swapserve-gpu2"
pytestmark = [pytest.mark.engines,
              pytest.mark.skipif(hub_available() is not None, reason=str(hub_available())),
              pytest.mark.skipif(postgres_available() is not None, reason=str(postgres_available()))]


def card_on(page: Page, node: str, model: str):  # type: ignore[no-untyped-def]
    return page.locator(f'{PANEL} .jp-SwapServe-model[data-node="{node}"][data-model="{model}"]')


def node_status(site: Hub, node: str, user: str = "teacher") -> dict:
    """The node service's own status, asked of it past the user's server."""
    r = httpx.get(site.node_url(node) + "swapserve/api/status", headers=site.headers(user), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def model_on(site: Hub, node: str, model: str) -> dict:
    return next(m for m in node_status(site, node)["models"] if m["name"] == model)


def swap(site: Hub, node: str, model: str, action: str) -> None:
    r = httpx.post(site.user_url("teacher") + f"swapserve/api/models/{model}/{action}?node={node}",
                   headers=site.headers("teacher"), timeout=300)
    assert r.status_code == 200 and r.headers["x-swapserve-node"] == node, r.text


@pytest.fixture(scope="module")
def lab_hub(hub: Hub) -> Iterator[Hub]:  # noqa: F811
    for name in ("teacher", "bob"):
        # no "Would you like to get notified about Jupyter news?" toast over the pictures
        settings = (hub.workdir / "home" / name / ".jupyter" / "lab" / "user-settings" / "@jupyterlab"
                    / "apputils-extension" / "notification.jupyterlab-settings")
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text('{"fetchNews": "false", "checkForUpdates": false}')
    yield hub


@pytest.mark.usefixtures("lab_hub")
def test_sidebar_across_two_nodes(hub: Hub, browser: Browser) -> None:  # noqa: F811
    # the starting point: smollm2 swapped out on both nodes, gemma on gpu1
    for node, model in ((GPU1, "smollm2"), (GPU2, "smollm2"), (GPU1, "gemma")):
        swap(hub, node, model, "swap-out")
    wait_for(hub, lambda s: on(s, "gpu1", "smollm2")["state"] == on(s, "gpu2", "smollm2")["state"] == "swapped_out"
             == on(s, "gpu1", "gemma")["state"], "smollm2 swapped out on both nodes, gemma on gpu1")

    # ---- the admin: both nodes' models, and a swap that acts on its own card's node
    with lab_as(browser, hub, "teacher", models=4, height=2200) as page:
        panel = page.locator(PANEL)
        expect(panel.locator(".jp-SwapServe-who")).to_have_text(
            "The shared swap services of 2 GPU nodes · you (teacher) are their admin")
        strip = panel.locator(".jp-SwapServe-nodes")
        expect(strip.locator(f'.jp-SwapServe-node[data-node="{GPU1}"]')).to_have_attribute("data-up", "true")
        expect(strip.locator(f'.jp-SwapServe-node[data-node="{GPU1}"] .jp-SwapServe-nodeModels')).to_have_text(
            "2 models: gemma, smollm2")
        expect(strip.locator(f'.jp-SwapServe-node[data-node="{GPU2}"] .jp-SwapServe-nodeModels')).to_have_text(
            "2 models: smollm2, gemma-b")
        for node, model in ((GPU1, "gemma"), (GPU1, "smollm2"), (GPU2, "smollm2"), (GPU2, "gemma-b")):
            expect(card_on(page, node, model).locator(".jp-SwapServe-onNode")).to_have_text(f"on {node}")
        devices = panel.locator(".jp-SwapServe-device")
        expect(devices).to_have_count(2)
        expect(panel.locator(f'.jp-SwapServe-device[data-node="{GPU1}"] .jp-SwapServe-deviceName')).to_have_text(
            "gpu1-cpu")
        expect(panel.locator(f'.jp-SwapServe-device[data-node="{GPU2}"] .jp-SwapServe-deviceName')).to_have_text(
            "gpu2-cpu")

        before = model_on(hub, GPU1, "smollm2")
        card_on(page, GPU2, "smollm2").get_by_role("button", name=f"Swap in smollm2 on {GPU2}").click()
        expect(card_on(page, GPU2, "smollm2")).to_have_attribute("data-state", "running", timeout=120_000)
        # gpu2's own service swapped it in; gpu1's smollm2 was not touched, and its card says so
        assert model_on(hub, GPU2, "smollm2")["state"] == "running"
        after = model_on(hub, GPU1, "smollm2")
        assert (after["state"], after["swaps_in"]) == ("swapped_out", before["swaps_in"])
        expect(card_on(page, GPU1, "smollm2")).to_have_attribute("data-state", "swapped_out")
        expect(panel.locator('[data-kind="error"]')).to_have_count(0)
        page.mouse.move(900, 600)
        page.wait_for_timeout(500)  # bar transitions
        page.evaluate(f"() => {{ document.activeElement?.blur(); document.querySelector('{PANEL}').scrollTop = 0; }}")
        screenshot(page, "sidebar-nodes.png")

    # ---- bob: "Use now" on the node of its card; a model his quota leaves out is not offered
    r = httpx.put(hub.user_url("teacher") + "swapserve/api/quotas/bob", headers=hub.headers("teacher"),
                  json={"allowed_models": ["smollm2"]}, timeout=60)
    assert r.status_code == 200, r.text
    try:
        with lab_as(browser, hub, "bob", models=4) as page:
            panel = page.locator(PANEL)
            expect(panel.locator(".jp-SwapServe-who")).to_have_text(
                "The shared swap services of 2 GPU nodes · signed in as bob")
            expect(panel.locator(".jp-SwapServe-swap-in:visible")).to_have_count(0)
            # gemma (gpu1) is not his: the reason in one line, and no "Use now" that works
            gemma = card_on(page, GPU1, "gemma")
            expect(gemma.locator(".jp-SwapServe-notAllowed")).to_have_text(
                "Your quota does not include gemma (allowed: smollm2); ask an admin.")
            expect(gemma).to_have_attribute("data-state", "swapped_out")
            expect(gemma.locator(".jp-SwapServe-prefetch")).to_be_visible()
            expect(gemma.locator(".jp-SwapServe-prefetch")).to_have_attribute("aria-disabled", "true")
            # the service refuses the hint for it all the same, through his server (and names the node)
            r = httpx.post(hub.user_url("bob") + f"swapserve/api/models/gemma/prefetch?node={GPU1}",
                           headers=hub.headers("bob"), timeout=60)
            assert r.status_code == 403 and r.headers["x-swapserve-node"] == GPU1, r.text
            assert r.json()["error"]["code"] == "model_not_allowed" and r.json()["error"]["param"] == "model"

            # smollm2 runs on gpu2 now: Use now on gpu1's card swaps in gpu1's
            before = model_on(hub, GPU2, "smollm2")
            use_now = card_on(page, GPU1, "smollm2").get_by_role("button",
                                                                  name=re.compile(f"^Use smollm2 on {GPU1} now"))
            expect(use_now).to_be_visible()
            use_now.click()
            expect(card_on(page, GPU1, "smollm2")).to_have_attribute("data-state", "running", timeout=120_000)
            expect(card_on(page, GPU1, "smollm2").locator(".jp-SwapServe-message")).to_contain_text(
                "smollm2 is being swapped in for you.")
            assert model_on(hub, GPU1, "smollm2")["state"] == "running"
            after = model_on(hub, GPU2, "smollm2")
            assert (after["state"], after["swaps_in"], after["swaps_out"]) == \
                (before["state"], before["swaps_in"], before["swaps_out"])  # gpu2's smollm2 untouched
            expect(card_on(page, GPU2, "smollm2")).to_have_attribute("data-state", before["state"])
            expect(panel.locator("[role=alert]")).to_be_hidden()
    finally:
        httpx.delete(hub.user_url("teacher") + "swapserve/api/quotas/bob", headers=hub.headers("teacher"), timeout=60)

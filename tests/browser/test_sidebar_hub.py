"""The sidebar on a shared node, as its people meet it: a real JupyterHub running
examples/jupyterhub_config.py (the demo models in the shared service), Debian's Chromium logging in
as the admin (teacher) and as a user (bob) through the hub's login page, each in their own
JupyterLab, whose sidebar reaches the service through their server in client mode.

What a person relies on, each checked in the page: the user is offered no control they may not use
(no Swap in/out; "Use now" instead, and it swaps the model in without a word of refusal); their
limit, what is left and when it resets, their refusal, and the count coming back when the minute
has passed with nothing else happening; the admin's form offering the hub's users and refusing a
model that does not exist, beside the Save it answers. The users route behind the picker: admins
only, and nothing in it but names. The views are photographed for docs/ (sidebar-admin.png,
sidebar-user.png)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from ..hub import Hub, hub_available, run_hub
from .test_sidebar import PANEL, browser, card, screenshot, show_panel, stat  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.engines, pytest.mark.skipif(hub_available() is not None, reason=str(hub_available()))]

ADMIN, USER = "teacher", "bob"


@pytest.fixture(scope="module")
def hub() -> Iterator[Hub]:
    with run_hub(admins=ADMIN) as h:
        for name in (ADMIN, USER):
            h.add_user(name)
            # no "Would you like to get notified about Jupyter news?" toast over the pictures
            settings = (h.workdir / "home" / name / ".jupyter" / "lab" / "user-settings" / "@jupyterlab"
                        / "apputils-extension" / "notification.jupyterlab-settings")
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text('{"fetchNews": "false", "checkForUpdates": false}')
        wait_service_models(h)
        yield h


def wait_service_models(hub: Hub, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(hub.user_url(USER) + "swapserve/api/status", headers=hub.headers(USER), timeout=30)
        if r.status_code == 200:
            states = [m["state"] for m in r.json()["models"]]
            if states and all(s in ("swapped_out", "running") for s in states):
                return r.json()
            assert "failed" not in states, r.text
        if time.monotonic() > deadline:
            raise TimeoutError(f"shared models not ready: {r.status_code} {r.text[:300]}\n{hub.log()}")
        time.sleep(0.5)


@contextlib.contextmanager
def lab_as(browser: Browser, hub: Hub, name: str, height: int = 1400, models: int = 2) -> Iterator[Page]:  # noqa: F811
    """The user logs in on the hub's page (the demo's dummy authenticator) and opens their JupyterLab,
    whose sidebar shows ``models`` model cards."""
    context: BrowserContext = browser.new_context(viewport={"width": 1280, "height": height}, device_scale_factor=2)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("pageerror", lambda exc: print(f"page error ({name}): {exc}"))
    try:
        page.goto(f"{hub.url}hub/login")
        page.fill("#username_input", name)
        page.fill("#password_input", "any")
        page.click("#login_submit")
        page.wait_for_url(re.compile(r"/(hub/home|hub/spawn|user/)"), timeout=60_000)
        page.goto(f"{hub.user_url(name)}lab")
        show_panel(page, timeout=120_000)
        expect(page.locator(f"{PANEL} .jp-SwapServe-model")).to_have_count(models)
        yield page
    finally:
        context.close()


def service_token(hub: Hub) -> str:
    """The shared service's own hub token, from its process (the hub gave it in its environment)."""
    for child in psutil.Process(hub.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any("jupyter_swapserve.hub" in part for part in child.cmdline()):
                token = child.environ().get("JUPYTERHUB_API_TOKEN")
                if token:
                    return token
    raise AssertionError("the swapserve service process was not found")


def test_the_users_route_is_for_admins_and_holds_names_only(hub: Hub) -> None:
    url = "swapserve/api/users"
    r = httpx.get(hub.user_url(USER) + url, headers=hub.headers(USER), timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    assert httpx.get(hub.service_url() + url, timeout=30).status_code in (302, 401, 403)
    r = httpx.get(hub.user_url(ADMIN) + url, headers=hub.headers(ADMIN), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"users", "source"} and body["source"] == "hub"
    assert {ADMIN, USER} <= set(body["users"]) and all(isinstance(u, str) for u in body["users"])
    # asked with the service's own token, which never leaves for the client (nor does anyone's)
    for secret in (service_token(hub), hub.admin_token, *hub.tokens.values()):
        assert secret not in r.text


def test_a_user_and_the_admin_on_the_shared_node(hub: Hub, browser: Browser) -> None:  # noqa: F811
    # ---- the admin: who they are, the hub's users to pick from, a limit for bob, a wrong model refused
    with lab_as(browser, hub, ADMIN, height=2600) as page:
        panel = page.locator(PANEL)
        expect(panel.locator(".jp-SwapServe-who")).to_have_text(
            f"The node's shared swap service · you ({ADMIN}) are its admin")
        expect(card(page, "gemma").get_by_role("button", name="Swap in gemma")).to_be_visible()
        quotas = panel.locator(".jp-SwapServe-quotas")
        expect(quotas).to_be_visible()
        expect(quotas.locator(f'datalist option[value="{USER}"]')).to_have_count(1)  # the hub's users
        add = quotas.get_by_label("User to give a quota")
        expect(quotas.locator(".jp-SwapServe-quotaAdd")).to_contain_text(
            re.compile(r"\d+ hub users? ha(s|ve) no row yet: pick from the list"))
        add.fill(USER)
        quotas.get_by_role("button", name="Add user").click()
        row = quotas.locator(f'fieldset[data-user="{USER}"]')
        says = row.locator(".jp-SwapServe-quotaActions .jp-SwapServe-quotaStatus")
        expect(says).to_have_text(f"Added {USER}: set their limits and save.")
        expect(quotas.locator(f'datalist option[value="{USER}"]')).to_have_count(0)  # has a row now
        # the fields explain themselves: label, unit, what an empty one means
        tokens = row.locator('[data-field="tokens_per_day"]').locator("xpath=..")
        expect(tokens.locator(".jp-SwapServe-quotaUnit")).to_have_text("tokens per UTC day")
        expect(tokens.locator(".jp-SwapServe-quotaEmpty")).to_have_text("empty: as default (no limit)")
        # a model that does not exist is refused by the service, beside this row's Save
        row.locator('[data-field="allowed_models"]').fill("smollm2, nosuchmodel")
        row.get_by_role("button", name=f"Save the quotas of {USER}").click()
        expect(says).to_have_text("Not saved (400): 'allowed_models' names 'nosuchmodel', which is not a model "
                                  "of this service (models: gemma, smollm2).")
        expect(says).to_have_attribute("data-kind", "error")
        row.locator('[data-field="allowed_models"]').fill("")
        row.locator('[data-field="requests_per_minute"]').fill("1")
        row.get_by_role("button", name=f"Save the quotas of {USER}").click()
        expect(says).to_have_text(f"Saved the quotas of {USER}.")
        expect(says).to_have_attribute("data-kind", "ok")
        page.mouse.move(900, 600)
        page.wait_for_timeout(500)  # bar transitions
        page.evaluate(f"() => {{ document.activeElement?.blur(); document.querySelector('{PANEL}').scrollTop = 0; }}")
        screenshot(page, "sidebar-admin.png")

    # ---- bob: his view, his limit, his refusal, the count coming back by itself
    with lab_as(browser, hub, USER) as page:
        panel = page.locator(PANEL)
        expect(panel.locator(".jp-SwapServe-who")).to_have_text(f"The node's shared swap service · signed in as {USER}")
        for name in ("gemma", "smollm2"):
            expect(card(page, name).locator(".jp-SwapServe-swap-in")).to_be_hidden()
            expect(card(page, name).locator(".jp-SwapServe-swap-out")).to_be_hidden()
        expect(panel.locator(".jp-SwapServe-quotas")).to_be_hidden()
        requests = panel.locator('.jp-SwapServe-usage [data-limit="requests"]')
        expect(requests).to_have_text("Requests: 1 per minute · 1 request left")

        from openai import OpenAI, RateLimitError

        client = OpenAI(base_url=hub.user_url(USER) + "swapserve/v1", api_key=hub.tokens[USER], max_retries=0)
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        expect(requests).to_have_text(re.compile(r"^Requests: 1 per minute · 0 requests left · resets at "
                                                 r"\d\d:\d\d:\d\d$"))
        with pytest.raises(RateLimitError):
            client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4)
        refusal = panel.locator(".jp-SwapServe-usageRefusal")
        expect(refusal).to_contain_text("(smollm2, 429): Rate limit reached: 1 request per minute")
        expect(refusal).to_have_attribute("data-active", "true")
        expect(card(page, "smollm2")).to_have_attribute("data-state", "running")
        expect(stat(page, "smollm2", "lastused")).not_to_have_text("never")
        expect(stat(page, "gemma", "lastused")).to_have_text("never")
        page.mouse.move(900, 600)
        page.wait_for_timeout(500)
        screenshot(page, "sidebar-user.png")

        # the minute passes with nothing happening on the service: the count comes back on its own
        # (the service's own status version, asked of it directly: a user's server bumps its own
        # version whenever it fetches the nodes' status)
        def service_version() -> int:
            return httpx.get(hub.service_url() + "swapserve/api/status", headers=hub.headers(USER),
                             timeout=30).json()["version"]

        version = service_version()
        expect(requests).to_have_text("Requests: 1 per minute · 1 request left", timeout=90_000)
        expect(refusal).to_have_attribute("data-active", "false")
        assert service_version() == version  # no status event moved it: the panel's own timer did

        # "Use now" on the swapped-out model: it is swapped in for bob, and nothing says he may not
        use_now = card(page, "gemma").get_by_role("button", name=re.compile("^Use gemma now"))
        expect(use_now).to_be_visible()
        use_now.click()
        expect(card(page, "gemma")).to_have_attribute("data-state", "running", timeout=60_000)
        message = card(page, "gemma").locator(".jp-SwapServe-message")
        expect(message).to_have_attribute("data-kind", "info")
        expect(message).to_contain_text("gemma is being swapped in for you.")
        expect(panel.locator('[data-kind="error"]')).to_have_count(0)
        expect(panel.locator("[role=alert]")).to_be_hidden()


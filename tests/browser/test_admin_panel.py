"""The sidebar's admin quota panel and usage section in a real browser (Debian's Chromium driven by
Playwright) against a real `jupyter lab` with the demo models: the admin sets a quota from the
sidebar, a request through the route is refused by it, and the usage table follows requests."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import Browser, expect

from ..server import ServerHandle
from .test_sidebar import PANEL, browser, lab, open_lab, screenshot  # noqa: F401 (fixtures)

pytestmark = pytest.mark.engines


def test_admin_sets_a_quota_in_the_sidebar_and_it_is_enforced(lab: ServerHandle, browser: Browser) -> None:  # noqa: F811
    page = open_lab(browser, lab)
    quotas = page.locator(f"{PANEL} .jp-SwapServe-quotas")
    expect(quotas).to_be_visible()  # the server's one user is its admin
    default_row = quotas.locator('fieldset[data-user="*"]')
    expect(default_row).to_be_visible()
    # each model's colour comes from the palette variable its data-color picks (base.css)
    swatch = page.locator(f"{PANEL} .jp-SwapServe-swatch[data-color]").first
    expect(swatch).to_be_attached()
    painted = swatch.evaluate("e => getComputedStyle(e).backgroundColor")
    assert painted not in ("", "rgba(0, 0, 0, 0)", "transparent"), painted

    # a first request shows up in the usage section
    r = httpx.post(lab.api + "/completions", headers=lab.headers(), timeout=120,
                   json={"model": "gemma", "prompt": "The capital of France is", "max_tokens": 4})
    assert r.status_code == 200, r.text
    usage = page.locator(f"{PANEL} .jp-SwapServe-usage")
    expect(usage.locator('tr[data-model="gemma"] .jp-SwapServe-usageRequests')).to_have_text("1", timeout=30_000)

    # the admin allows only smollm2 for everyone, and saves
    allowed = default_row.locator('[data-field="allowed_models"]')
    allowed.fill("smollm2")
    default_row.get_by_role("button", name="Save the quotas of *").click()
    saved = default_row.locator(".jp-SwapServe-quotaActions .jp-SwapServe-quotaStatus")  # beside its Save
    expect(saved).to_have_text("Saved the quotas of *.")
    expect(saved).to_have_attribute("data-kind", "ok")
    stored = httpx.get(lab.url + "swapserve/api/quotas", headers=lab.headers(), timeout=30).json()
    assert stored["quotas"][0]["allowed_models"] == ["smollm2"]

    # enforced on the route
    r = httpx.post(lab.api + "/completions", headers=lab.headers(), timeout=120,
                   json={"model": "gemma", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"

    # a bad value is refused in the panel, naming the field, and nothing is sent
    tokens = default_row.locator('[data-field="tokens_per_day"]')
    tokens.fill("lots")
    default_row.get_by_role("button", name="Save the quotas of *").click()
    expect(saved).to_have_text("Not saved: Tokens per day: enter a number ≥ 0, or leave it empty.")
    expect(saved).to_have_attribute("data-kind", "error")

    # a per-user row: alice gets a model-specific limit; then removed again
    quotas.get_by_label("User to give a quota").fill("alice")
    quotas.get_by_role("button", name="Add user").click()
    alice = quotas.locator('fieldset[data-user="alice"]')
    expect(alice).to_be_visible()
    alice_says = alice.locator(".jp-SwapServe-quotaStatus")
    expect(alice_says).to_have_text("Added alice: set their limits and save.")
    alice.locator('[data-field="models"]').fill("smollm2: tokens_per_day=500")
    alice.get_by_role("button", name="Save the quotas of alice").click()
    expect(alice_says).to_have_text("Saved the quotas of alice.")
    row = httpx.get(lab.url + "swapserve/api/quotas/alice", headers=lab.headers(), timeout=30).json()
    assert row["models"] == {"smollm2": {"tokens_per_day": 500}}
    # a model the service does not have: the server refuses it (400 naming the field), the message
    # sits beside alice's Save, marked as an error, and the field it names is marked too
    overrides = alice.locator('[data-field="models"]')
    overrides.fill("nosuchmodel: tokens_per_day=5")
    alice.get_by_role("button", name="Save the quotas of alice").click()
    expect(alice_says).to_have_text("Not saved (400): 'models.nosuchmodel' is not a model of this service "
                                    "(models: gemma, smollm2).")
    expect(alice_says).to_have_attribute("data-kind", "error")
    expect(overrides).to_have_attribute("aria-invalid", "true")
    expect(saved).to_have_text("Saved the quotas of *.")  # the other row's message is its own
    row = httpx.get(lab.url + "swapserve/api/quotas/alice", headers=lab.headers(), timeout=30).json()
    assert row["models"] == {"smollm2": {"tokens_per_day": 500}}  # nothing was stored
    screenshot(page, "sidebar-admin-quotas.png")
    alice.get_by_role("button", name="Remove the quotas of alice (back to the default)").click()
    expect(quotas.locator('fieldset[data-user="alice"]')).to_have_count(0)
    expect(quotas.locator(".jp-SwapServe-quotaAdd .jp-SwapServe-quotaStatus")).to_have_text(
        "alice is back on the default quota.")

    # lift the limit from the panel: empty means every model; the route serves gemma again
    tokens.fill("")
    allowed.fill("")
    default_row.get_by_role("button", name="Save the quotas of *").click()
    expect(saved).to_have_text("Saved the quotas of *.")
    r = httpx.post(lab.api + "/completions", headers=lab.headers(), timeout=120,
                   json={"model": "gemma", "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    # two served gemma requests (the refused one never counted)
    expect(usage.locator('tr[data-model="gemma"] .jp-SwapServe-usageRequests')).to_have_text("2", timeout=30_000)
    expect(usage.locator('[data-limit="tokens"]')).to_contain_text("tokens today (UTC day)")

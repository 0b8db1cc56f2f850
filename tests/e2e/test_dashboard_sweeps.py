"""The Sweeps page in Debian's Chromium against a real uvicorn server whose Ray is the stand-in
of tests/integration/test_sweeps.py (drivers finish at once with a report that follows from the
trial's spec): the list, the trials table, the front as a scatter whose points link to their
jobs, the best trial under an accuracy drop, and cancel."""

from __future__ import annotations

import httpx
import pytest
from playwright.sync_api import expect

from api.app import create_app
from service.artifacts import LocalArtifactStore
from service.settings import Settings
from tests.conftest import wait_for
from tests.integration.test_sweeps import FAST, ReportingRay, sweep_body
from tests.plugins.browser import shot
from tests.plugins.server import serve_app

pytestmark = pytest.mark.e2e

TOKEN = "dashboard-sweeps-token-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    artifacts = LocalArtifactStore(data / "artifacts")
    ray = ReportingRay(artifacts=artifacts)
    settings = Settings(data_dir=data, api_tokens=f"{TOKEN}:t", **FAST)
    with serve_app(create_app(settings, ray=ray, artifacts=artifacts)) as url:
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        yield url, api, ray
        api.close()


def sign_in(page, url: str, route: str) -> None:
    page.goto(f"{url}/{route}")
    page.fill("#token", TOKEN)
    page.keyboard.press("Enter")
    expect(page.locator("#nav")).to_be_visible()


def test_sweep_page_shows_trials_and_the_front_linking_to_jobs(page, server):
    url, api, _ = server
    sweep_id = api.post("/v1/sweeps", json=sweep_body("ui-grid")).json()["id"]
    wait_for(lambda: api.get(f"/v1/sweeps/{sweep_id}").json()["state"] == "succeeded", 30, 0.1, "the sweep")
    sweep = api.get(f"/v1/sweeps/{sweep_id}", params={"max_accuracy_drop": 7}).json()
    sign_in(page, url, "#/sweeps")
    expect(page.locator("#sweeps-table tbody tr").first).to_contain_text("ui-grid")
    page.click("text=ui-grid")
    rows = page.locator("#trials-table tbody tr")
    expect(rows).to_have_count(4)
    expect(rows.nth(1)).to_contain_text("89.4%")
    points = page.locator("#sweep-scatter a.point")
    expect(points).to_have_count(4)
    expect(page.locator("#sweep-scatter a.point.front")).to_have_count(3)
    page.fill("#max-drop", "7")
    page.locator("#max-drop").dispatch_event("change")
    expect(rows.nth(2)).to_contain_text("best")
    shot(page, "sweep")
    # A point is a link to its trial's job.
    page.locator(f'#sweep-scatter a[data-job="{sweep["best"]}"]').click()
    expect(page).to_have_url(f"{url}/#/jobs/{sweep['best']}")


def test_cancel_from_the_page(page, server):
    url, api, ray = server
    ray.hold = True
    try:
        sweep_id = api.post("/v1/sweeps", json=sweep_body("ui-cancel", baseline=False)).json()["id"]
        sign_in(page, url, f"#/sweeps/{sweep_id}")
        expect(page.locator("#trials-table tbody tr")).to_have_count(2, timeout=10_000)
        page.click("#cancel-sweep")
        expect(page.locator(".page-head .badge")).to_have_text("cancelled", timeout=10_000)
        expect(page.locator("#cancel-sweep")).to_be_disabled()
    finally:
        ray.hold = False

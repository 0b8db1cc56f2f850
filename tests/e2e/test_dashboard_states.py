"""The dashboard's views of states a real cluster rarely produces on cue (many jobs, a driver lost
twice, hostile text in Ray's messages), in Debian's Chromium against a real uvicorn server. The
Ray Jobs API is the stand-in the tests drive (tests/plugins/fake_ray.py): what is tested is the
page, not Ray. The real-Ray path is test_dashboard.py."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.sync_api import expect

from api.app import create_app
from service.artifacts import LocalArtifactStore
from service.settings import Settings
from tests.conftest import wait_for
from tests.plugins.browser import shot
from tests.plugins.fake_ray import FAILED, FakeRay
from tests.plugins.server import serve_app

pytestmark = pytest.mark.e2e

TOKEN = "dashboard-states-token-0123456789"
HOSTILE = '<img src=x onerror="document.title=1">exit code -9'


class Fake:
    def __init__(self, url: str, ray: FakeRay):
        self.url, self.ray = url, ray
        self.api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def submit(self, **over) -> str:
        spec = {"name": "j", "model": {"name": "mlp"}, "data": {"name": "digits"}, **over}
        r = self.api.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.api.get(f"/v1/jobs/{job_id}").json()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    settings = Settings(
        data_dir=data,
        api_tokens=f"{TOKEN}:t",
        scheduler_interval_s=0.1,
        reconcile_interval_s=0.1,
        ingest_interval_s=0.1,
    )
    ray = FakeRay(cpu=2)
    with serve_app(create_app(settings, ray=ray, artifacts=LocalArtifactStore(data / "artifacts"))) as url:
        yield Fake(url, ray)


def sign_in(page, fake: Fake, route: str = "") -> None:
    page.goto(f"{fake.url}/{route}")
    page.fill("#token", TOKEN)
    page.keyboard.press("Enter")
    expect(page.locator("#nav")).to_be_visible()


def test_jobs_table_pages_filters_and_updates_live(page, fake):
    # 23 jobs that can never fit the 2-CPU stand-in stay queued, each with its reason.
    ids = [fake.submit(name=f"wide-{i:02d}", parallel={"workers": 4}) for i in range(23)]
    sign_in(page, fake)
    rows = page.locator("#jobs-table tbody tr")
    expect(rows).to_have_count(20)
    expect(rows.first).to_contain_text("wide-22")  # newest first
    page.click("text=Older →")
    expect(rows).to_have_count(3)
    expect(rows.last).to_contain_text("wide-00")
    expect(page.locator("text=Older →")).to_be_disabled()
    page.click("text=← Newer")
    expect(rows).to_have_count(20)
    # Live: a change made elsewhere shows up without a reload.
    assert fake.api.post(f"/v1/jobs/{ids[-1]}/cancel").status_code == 200
    expect(rows.first.locator(".badge")).to_have_text("cancelled", timeout=10_000)
    page.select_option("#state-filter", "cancelled")
    expect(page).to_have_url(re.compile(r"#/jobs\?state=cancelled$"))
    expect(rows).to_have_count(1)
    shot(page, "10-jobs-filtered")


def test_a_lost_driver_shows_its_error_and_attempts_as_text(page, fake):
    job = fake.submit(name="lost-twice", retries=1, parallel={"workers": 1}, train={"batch_size": 64})
    for attempt in (job, f"{job}-a2"):
        wait_for(lambda a=attempt: a in fake.ray.jobs, 10, 0.05, f"{attempt} submitted")
        fake.ray.set(attempt, FAILED, HOSTILE)
    wait_for(lambda: fake.job(job)["state"] == "failed", 10, 0.05, "failed")
    sign_in(page, fake, f"#/jobs/{job}")
    expect(page.locator(".page-head .badge")).to_have_text("failed")
    expect(page.locator("#job-error")).to_contain_text("driver_lost")
    history = page.locator("#history tbody tr")
    expect(history).to_have_count(2)
    expect(history.nth(0)).to_contain_text("lost")
    # Ray's message is shown as the text it is, never parsed as markup.
    expect(history.nth(1)).to_contain_text(HOSTILE)
    expect(page.locator("#history img, #job-summary img")).to_have_count(0)
    assert page.title() == "lost-twice · slimtrain"
    expect(page.locator("#cancel")).to_have_count(0)  # nothing to cancel
    shot(page, "11-job-failed")


def test_the_editor_converts_to_json_and_marks_json_lines(page, fake):
    page.console_errors.allow(422)
    sign_in(page, fake, "#/submit")
    expect(page.locator("#spec-editor")).to_have_value(re.compile("digits-lenet5-gmp90"))
    page.select_option("#format", "json")
    editor = page.locator("#spec-editor")
    expect(editor).to_have_value(re.compile(r'^\{\n  "name": "digits-lenet5-gmp90"'))
    text = editor.input_value().replace('"workers": 2', '"workers": "two"')
    editor.fill(text)
    page.click("#submit-spec")
    line = next(i for i, s in enumerate(text.split("\n"), 1) if '"workers": "two"' in s)
    mark = page.locator(f".overlay .line:nth-child({line}) .field-error[data-field~='parallel.workers']")
    expect(mark).to_be_visible()
    # The schema's description of the field explains it in the error list.
    doc = page.locator("#spec-errors .field-doc")
    expect(doc).to_contain_text("Ray Train workers (one process each). · default: 1")
    # The error list's link puts the caret on that line.
    page.click("#spec-errors button")
    start = page.evaluate("() => document.getElementById('spec-editor').selectionStart")
    assert text[:start].count("\n") == line - 1
    shot(page, "12-submit-json-error")


def test_an_unknown_job_says_so(page, fake):
    page.console_errors.allow(404)  # the API's answer for the missing job
    sign_in(page, fake, "#/jobs/20990101-000000-deadbeef")
    expect(page.locator("#job-summary .error")).to_contain_text("20990101-000000-deadbeef")
    expect(page.locator("#cancel")).to_have_count(0)

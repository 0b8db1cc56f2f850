"""The dashboard in Debian's Chromium against a real uvicorn server and the session's real Ray
head: sign in, a refused spec marked on its line, the digits example submitted through the form
and watched to `succeeded` with its curves and report, cancel with its confirmation, compare,
cluster, and every page at 1280 px and 390 px. Screenshots go to test-artifacts/dashboard/.
The `page` fixture fails any test whose page logs a console error."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from playwright.sync_api import expect

from api.app import create_app
from service.settings import Settings
from tests.conftest import wait_for
from tests.plugins.browser import NARROW, shot
from tests.plugins.server import serve_app

pytestmark = pytest.mark.e2e

TOKEN = "dashboard-e2e-token-0123456789"
JOB_TIMEOUT_S = 300
CHARTS = ["loss", "accuracy", "lr", "throughput", "sparsity"]


class Server:
    def __init__(self, url: str):
        self.url = url
        self.api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        self.jobs: dict[str, str] = {}  # what the tests created: role -> job id

    def job(self, job_id: str) -> dict:
        return self.api.get(f"/v1/jobs/{job_id}").json()

    def wait_state(self, job_id: str, state: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        return wait_for(
            lambda: (j := self.job(job_id))["state"] == state and j, timeout, 0.5, f"{job_id} {state}"
        )


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    data = tmp_path_factory.mktemp("dashboard")
    settings = Settings(
        data_dir=data,
        api_tokens=f"{TOKEN}:e2e",
        ray_address=ray_cluster["address"],
        ray_dashboard_url=ray_cluster["dashboard_url"],
        scheduler_interval_s=0.5,
        reconcile_interval_s=1.0,
        ingest_interval_s=0.5,
    )
    with serve_app(create_app(settings)) as url:
        yield Server(url)


def sign_in(page, server: Server, path: str = "") -> None:
    page.goto(f"{server.url}/{path}")
    page.fill("#token", TOKEN)
    page.click("form.login button[type=submit]")
    expect(page.locator("#nav")).to_be_visible()


def open_submit(page, server: Server, example: str = "digits-gmp90") -> str:
    page.goto(f"{server.url}/#/submit")
    page.select_option("#example", example)
    expect(page.locator("#spec-editor")).to_have_value(re.compile(r"name: "))
    return page.input_value("#spec-editor")


def job_id_from(page) -> str:
    page.wait_for_url(re.compile(r"#/jobs/[0-9a-z-]+$"))
    return page.url.rsplit("/", 1)[-1]


def test_sign_in_keeps_the_token_in_session_storage_only(page, server):
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.console_errors.allow(401)  # the wrong token below is refused on purpose
    page.goto(f"{server.url}/")
    expect(page.locator("#token")).to_be_focused()
    shot(page, "01-sign-in")
    page.fill("#token", "not-the-token-0123456789")
    page.keyboard.press("Enter")
    expect(page.locator("#login-error")).to_have_text("That token was not accepted.")
    page.fill("#token", TOKEN)
    page.keyboard.press("Enter")
    expect(page.locator("#nav")).to_be_visible()
    expect(page.locator("h1")).to_have_text("Jobs")
    assert page.evaluate("() => sessionStorage.getItem('slimtrain.token')") == TOKEN
    assert page.evaluate("() => localStorage.length") == 0
    assert urls and not [u for u in urls if TOKEN in u]
    # A reload keeps the session (same tab); signing out forgets the token.
    page.reload()
    expect(page.locator("#nav")).to_be_visible()
    page.click("#sign-out")
    expect(page.locator("#token")).to_be_visible()
    assert page.evaluate("() => sessionStorage.length") == 0


def test_a_refused_spec_shows_each_field_error_on_its_line(page, server):
    page.console_errors.allow(422)  # the server's answer to the bad spec
    sign_in(page, server)
    text = open_submit(page, server)
    bad = text.replace("lr: 0.05", "lr: -1").replace("name: lenet5", "name: resnet50")
    page.fill("#spec-editor", bad)
    page.click("#submit-spec")
    lines = bad.split("\n")
    for field, needle in [("train.lr", "lr: -1"), ("model.name", "name: resnet50")]:
        line = next(i for i, s in enumerate(lines, 1) if needle in s)
        mark = page.locator(f".overlay .line:nth-child({line}) .field-error[data-field~='{field}']")
        expect(mark).to_be_visible()
        expect(mark).to_contain_text(field)
        expect(page.locator(f".gutter div:nth-child({line})")).to_have_class("bad")
    expect(page.locator("#spec-errors")).to_contain_text("allowed: mlp, lenet5, convnet, gpt, resnet")
    shot(page, "02-submit-field-errors")
    # Syntax errors are caught before anything is sent, and marked the same way.
    page.fill("#spec-editor", "name: x\nmodel: {name: mlp\ndata: {name: digits}\n")
    page.click("#submit-spec")
    expect(page.locator(".field-error[data-field~='(syntax)']")).to_be_visible()
    assert page.url.endswith("#/submit")  # nothing was created
    assert server.api.get("/v1/jobs").json()["items"] == []


def test_submit_the_digits_example_and_watch_it_succeed(page, server):
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    sign_in(page, server)
    text = open_submit(page, server)
    # The example, shortened to ~110 steps so the suite stays fast: an eval every 10 steps, and a
    # pruning schedule that ends before the last step.
    short = text.replace("epochs: 30,", "epochs: 5, eval_every_steps: 10,").replace(
        "start_step: 50, end_step: 600, frequency: 25", "start_step: 20, end_step: 80, frequency: 10"
    )
    assert short != text and "eval_every_steps" in short and "end_step: 80" in short
    page.fill("#spec-editor", short)
    shot(page, "03-submit-digits")
    page.click("#submit-spec")
    job_id = job_id_from(page)
    server.jobs["digits"] = job_id
    expect(page.locator("h1")).to_have_text("digits-lenet5-gmp90")
    # Watched live: the page shows it running with curves growing, then finished.
    expect(page.locator(".page-head .badge")).to_have_text("running", timeout=JOB_TIMEOUT_S * 1000)
    expect(page.locator(".page-head .badge")).to_have_text("succeeded", timeout=JOB_TIMEOUT_S * 1000)
    expect(page.locator("#stream-status")).to_have_text("Finished: succeeded.")

    metrics = server.api.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "train"}).json()["items"]
    assert len(metrics) >= 10
    for name in CHARTS:
        chart = page.locator(f"#chart-{name}")
        expect(chart.locator("canvas")).to_have_count(1)
        assert int(chart.get_attribute("data-points")) >= 10, name
    # The loss chart draws exactly the records the API holds: its longer series, train loss or
    # validation loss (which starts at step 0, the driver's score of the initial model).
    evals = server.api.get(f"/v1/jobs/{job_id}/metrics", params={"kind": "eval"}).json()["items"]
    assert evals[0]["step"] == 0
    assert int(page.get_attribute("#chart-loss", "data-points")) == max(len(metrics), len(evals))
    # The target is the whole schedule from the start record, ending at the final sparsity.
    expect(page.locator("#chart-sparsity")).to_have_attribute(
        "aria-label", re.compile(r"target \(schedule\) 0\.9\b")
    )

    report = server.api.get(f"/v1/jobs/{job_id}/report").json()
    cards = page.locator("#report-cards")
    expect(cards).to_contain_text(f"{report['accuracy'] * 100:.2f}%")
    expect(cards).to_contain_text("Compression ratio")
    expect(cards).to_contain_text("Latency")
    if report["latency_setup"]["same_artifact"]:  # nothing quantized: no ratio of a model with itself
        expect(cards).to_contain_text("the dense model.onnx ships as is")
    else:
        speedup = report["latency_ms"]["dense"] / report["latency_ms"]["compressed"]  # a slowdown says so
        expect(cards).to_contain_text(
            "as fast" if abs(speedup - 1) < 0.005 else "× faster" if speedup > 1 else "× slower"
        )
    steps = page.locator("#report .facts div", has=page.locator("dt", has_text="Steps")).locator("dd")
    expect(steps).to_have_text(str(report["steps"]))
    # where each rank trained, summed up as the CLI does it (two workers on the CPU here)
    assert report["devices"] == ["cpu", "cpu"]
    trained = page.locator("#report .facts div", has=page.locator("dt", has_text="Trained on")).locator("dd")
    expect(trained).to_have_text("2 x cpu")
    expect(page.locator("#layer-sparsity li")).to_have_count(len(report["sparsity"]["layers"]))
    expect(page.locator("#log")).to_contain_text("=== attempt 1")
    expect(page.locator("#history tbody tr")).to_have_count(1)
    expect(page.locator("#history tbody")).to_contain_text("succeeded")

    # Downloads go through the authenticated API and arrive intact.
    with page.expect_download() as info:
        page.click("#artifacts button[aria-label='Download report.json']")
    download = info.value
    assert download.suggested_filename == "report.json"
    assert json.loads(download.path().read_text()) == report
    expect(page.locator("#artifacts")).to_contain_text("model.onnx")
    assert not [u for u in urls if TOKEN in u]
    shot(page, "04-job-succeeded")
    page.set_viewport_size(NARROW)
    shot(page, "04-job-succeeded-narrow")


def test_cancel_asks_first_then_cancels(page, server):
    sign_in(page, server)
    text = open_submit(page, server, "digits-dense")
    # Four workers never fit the 2-CPU test cluster: the job waits, with the reason shown.
    wide = text.replace("workers: 2", "workers: 4").replace("name: digits-", "name: wide-")
    page.fill("#spec-editor", wide)
    page.click("#submit-spec")
    job_id = job_id_from(page)
    server.jobs["wide"] = job_id
    expect(page.locator("#job-summary")).to_contain_text("cannot run on this cluster", timeout=30_000)

    page.click("#nav a[data-page=cluster]")
    queue = page.locator("#cluster section:has(h2:text('Queue')) tbody")
    expect(queue).to_contain_text("wide-lenet5-dense")
    expect(queue).to_contain_text("cannot run on this cluster: needs 4 CPU")
    expect(page.locator("#cluster")).to_contain_text("CPUs")
    shot(page, "05-cluster")
    page.set_viewport_size(NARROW)
    shot(page, "05-cluster-narrow")
    page.go_back()

    page.click("#cancel")
    dialog = page.locator("dialog.confirm")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("wide-lenet5-dense")
    shot(page, "06-cancel-confirm")
    dialog.locator("button", has_text="Keep it").click()
    expect(dialog).to_have_count(0)
    assert server.job(job_id)["state"] == "queued"
    page.click("#cancel")
    page.locator("dialog.confirm button", has_text="Cancel job").click()
    expect(page.locator(".page-head .badge")).to_have_text("cancelled", timeout=10_000)
    expect(page.locator("#cancel")).to_have_count(0)
    assert server.wait_state(job_id, "cancelled", 10)["reason"] == "cancelled by the user"
    shot(page, "06-job-cancelled")


def test_compare_overlays_curves_and_plots_reports(page, server):
    # A second finished job to set against the pruned one: the dense MLP, one worker, fp32.
    spec = {
        "name": "digits-mlp-dense",
        "model": {"name": "mlp"},
        "data": {"name": "digits"},
        "train": {"epochs": 4, "batch_size": 64, "eval_every_steps": 10},
        "parallel": {"workers": 1},
    }
    r = server.api.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    dense = r.json()["id"]
    server.jobs["dense"] = dense
    server.wait_state(dense, "succeeded")
    pruned = server.jobs["digits"]

    sign_in(page, server)
    page.click("#nav a[data-page=compare]")
    expect(page.locator("#compare-results")).to_contain_text("Choose at least two jobs.")
    page.check(f"#cmp-{pruned}")
    page.check(f"#cmp-{dense}")
    expect(page).to_have_url(re.compile(r"#/compare\?ids="))
    for name in ["loss", "accuracy", "sparsity"]:
        chart = page.locator(f"#cmp-{name}")
        expect(chart.locator("canvas")).to_have_count(1)
        assert int(chart.get_attribute("data-points")) >= 10, name
        expect(chart).to_contain_text("digits-lenet5-gmp90")
        expect(chart).to_contain_text("digits-mlp-dense")
    scatter = page.locator("#cmp-scatter")
    expect(scatter.locator("circle")).to_have_count(2)
    ratios = {j: server.api.get(f"/v1/jobs/{j}/report").json()["size"]["ratio"] for j in (pruned, dense)}
    assert ratios[pruned] > ratios[dense]  # pruning to 80%+ packs smaller than dense weights
    expect(page.locator("#compare-table")).to_contain_text("digits-mlp-dense")
    shot(page, "07-compare")
    page.set_viewport_size(NARROW)
    shot(page, "07-compare-narrow")


def test_every_page_fits_a_narrow_screen_and_works_by_keyboard(page, server):
    page.set_viewport_size(NARROW)
    sign_in(page, server)
    expect(page.locator("#jobs-table tbody tr")).to_have_count(3)
    # Keyboard only: Tab to the Submit link, Enter opens the page.
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.textContent") == "Submit":
            break
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("Submit a job")
    pages = {  # name: (route, what shows once the page has its data)
        "jobs": ("#/jobs", "#jobs-table tbody tr"),
        "jobs-succeeded": ("#/jobs?state=succeeded", "#jobs-table tbody tr"),
        "submit": ("#/submit", ".gutter div:nth-child(5)"),  # an example is loaded
        "cluster": ("#/cluster", "#cluster .cards"),
        "compare": (f"#/compare?ids={server.jobs['digits']},{server.jobs['dense']}", "#cmp-scatter circle"),
        "job": (f"#/jobs/{server.jobs['digits']}", "#report-cards"),
    }
    for name, (route, ready) in pages.items():
        page.goto(f"{server.url}/{route}")
        expect(page.locator(ready).first).to_be_visible()
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{name} scrolls sideways by {overflow}px at 390 px"
        shot(page, f"08-narrow-{name}")
    # The state filter narrows the table.
    page.goto(f"{server.url}/#/jobs?state=cancelled")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(1)
    expect(page.locator("#jobs-table tbody")).to_contain_text("wide-lenet5-dense")
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(f"{server.url}/#/jobs")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(3)
    shot(page, "09-jobs")

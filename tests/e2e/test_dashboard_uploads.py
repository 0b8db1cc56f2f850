"""The Submit page's pickers for a job's data and initial weights, in Debian's Chromium against the
live API (tests/plugins/live_api.py: real uvicorn, SQLite, a local artifact store; its Ray
stand-in finishes each job as it is submitted, which is all a starting point needs here). A
tenant's uploaded dataset (a parquet file, whose columns the page offers for `label_column`),
uploaded model and succeeded job are offered, and a set of shards (uploaded as SET/SHARD) as one
choice `SET/` that reads the set whole (`store://datasets/SET/`); what is chosen is what the
stored spec says. A
tenant with nothing uploaded is told the CLI commands; a server without `/v1/datasets` (404)
still offers the built-in datasets."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from playwright.sync_api import expect
from safetensors.torch import save as st_save
from sklearn.datasets import load_digits

from service.artifacts import LocalArtifactStore
from tests.plugins.browser import NARROW, shot
from tests.plugins.live_api import ALICE, BOB, LiveApi, live_api

pytestmark = pytest.mark.e2e

DATASET, MODEL, SET = "digits.parquet", "base", "digits-parts"


def _parquet(rows: slice = slice(None)) -> bytes:
    d = load_digits()
    table = pa.table(
        {
            "pixels": pa.array(
                [row.tolist() for row in d.data[rows].astype(np.float32)], pa.list_(pa.float32())
            ),
            "label": pa.array(d.target[rows].astype(np.int64)),
        }
    )
    out = io.BytesIO()
    pq.write_table(table, out)
    return out.getvalue()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    data = tmp_path_factory.mktemp("uploads")
    with live_api(data, LocalArtifactStore(data / "artifacts")) as api:
        yield api


def sign_in(page, api: LiveApi, token: str) -> None:
    page.goto(f"{api.url}/#/submit")
    page.fill("#token", token)
    page.click("form.login button[type=submit]")
    expect(page.locator("#nav")).to_be_visible()
    expect(page.locator("#spec-editor")).to_have_value(re.compile(r"name: "))  # examples loaded
    page.select_option("#example", "")  # only the required fields: mlp on digits
    expect(page.locator("#spec-editor")).to_have_value(re.compile(r"^name: my-job"))


def editing(page) -> dict:
    return yaml.safe_load(page.input_value("#spec-editor"))


def test_uploads_and_finished_jobs_are_offered_and_end_up_in_the_spec(page, api):
    alice = api.client(ALICE)
    r = alice.put(f"/v1/models/{MODEL}", content=st_save({"w": torch.ones(4, 4), "b": torch.zeros(4)}))
    assert r.status_code == 201, r.text
    r = alice.put(f"/v1/datasets/{DATASET}", content=_parquet())
    assert r.status_code == 201, r.text
    for k, rows in enumerate((slice(0, 900), slice(900, None))):  # every class in each shard
        r = alice.put(f"/v1/datasets/{SET}/part-{k}.parquet", content=_parquet(rows))
        assert r.status_code == 201, r.text
    spec = {"name": "parent", "model": {"name": "mlp"}, "data": {"name": "digits"}}
    parent = alice.post("/v1/jobs", json=spec)
    parent_id = parent.json()["id"]
    assert alice.get(f"/v1/jobs/{parent_id}").json()["state"] == "succeeded"

    sign_in(page, api, ALICE)
    editor, dataset = page.locator("#spec-editor"), page.locator("#dataset-picker")
    init = page.locator("#init-picker")
    upload = dataset.locator(f"option[value='upload:{DATASET}']")
    expect(upload).to_contain_text("parquet, 1797 samples, 10 classes")
    expect(dataset).to_have_value("builtin:digits")  # follows the spec in the editor
    expect(init).to_have_value("none")
    expect(page.locator("#dataset-hint")).to_be_empty()

    # a parquet upload: its columns are offered for the label and the features, as written
    dataset.select_option(f"upload:{DATASET}")
    expect(editor).to_have_value(re.compile(rf"uri: store://datasets/{re.escape(DATASET)}"))
    expected = {"uri": f"store://datasets/{DATASET}", "label_column": "label", "feature_columns": ["pixels"]}
    assert editing(page)["data"] == expected  # name: digits is gone
    column = page.locator("#label-column")
    expect(column.locator("option")).to_have_text(["pixels", "label"])
    expect(column).to_have_value("label")
    column.select_option("pixels")
    expect(editor).to_have_value(re.compile(r"label_column: pixels"))
    assert editing(page)["data"]["feature_columns"] == ["label"]
    column.select_option("label")
    expect(page.locator("#feature-columns input:checked")).to_have_count(1)
    expect(page.locator("#feature-columns input")).to_have_value("pixels")

    # a set of shards is one choice, SET/, read whole; its columns are its shards'
    whole = dataset.locator(f"option[value='upload:{SET}/']")
    expect(whole).to_contain_text(f"{SET}/ — parquet, 2 shards, 1797 samples, 10 classes")
    expect(dataset.locator(f"option[value^='upload:{SET}/part-']")).to_have_count(0)
    dataset.select_option(f"upload:{SET}/")
    expect(editor).to_have_value(re.compile(rf"uri: store://datasets/{SET}/\n"))
    assert editing(page)["data"] == {**expected, "uri": f"store://datasets/{SET}/"}
    expect(dataset).to_have_value(f"upload:{SET}/")
    expect(page.locator("#label-column")).to_have_value("label")

    # a finished job, then an uploaded model: one `init` at a time
    expect(init.locator(f"option[value='job:{parent_id}']")).to_contain_text("parent · mlp")
    init.select_option(f"job:{parent_id}")
    expect(editor).to_have_value(re.compile(rf"init: \{{ job: {parent_id} \}}"))
    init.select_option(f"model:{MODEL}")
    expect(editor).to_have_value(re.compile(rf"init: \{{ uri: store://models/{MODEL} \}}"))
    assert editing(page)["model"] == {"name": "mlp", "init": {"uri": f"store://models/{MODEL}"}}
    shot(page, "20-submit-uploads")
    page.set_viewport_size(NARROW)  # long option labels must not widen a phone's page
    assert page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth") <= 0
    shot(page, "20-submit-uploads-narrow")

    page.click("#submit-spec")
    page.wait_for_url(re.compile(r"#/jobs/[0-9a-z-]+$"))
    job = alice.get(f"/v1/jobs/{page.url.rsplit('/', 1)[-1]}").json()
    assert job["spec"]["data"]["uri"] == f"store://datasets/{SET}/"
    assert job["spec"]["data"]["resolved_uri"] == f"_tenants/alice/datasets/{SET}/"
    assert job["spec"]["data"]["label_column"] == "label" and job["spec"]["data"]["name"] is None
    assert job["spec"]["data"]["feature_columns"] == ["pixels"]
    assert job["spec"]["model"]["init"]["uri"] == f"store://models/{MODEL}"
    assert job["spec"]["model"]["init"]["job"] is None


def test_nothing_uploaded_gives_the_cli_commands_and_a_missing_route_breaks_nothing(page, api):
    # as a server without the datasets route answers
    page.route(
        re.compile(r".*/v1/datasets$"),
        lambda route: route.fulfill(status=404, json={"error": {"code": "not_found", "message": "no"}}),
    )
    page.console_errors.allow(404)
    sign_in(page, api, BOB)
    expect(page.locator("#init-hint")).to_contain_text("slimtrain model push FILE NAME")
    expect(page.locator("#dataset-hint")).to_contain_text("lists no uploaded datasets")
    dataset = page.locator("#dataset-picker")
    expect(dataset.locator("optgroup[label='Built-in'] option")).to_have_text(["digits", "synthetic", "text"])
    expect(page.locator("#init-picker optgroup")).to_have_count(0)  # alice's model and jobs are hers
    dataset.select_option("builtin:synthetic")
    expect(page.locator("#spec-editor")).to_have_value(re.compile(r"name: synthetic"))
    assert editing(page)["data"] == {"name": "synthetic"}
    # and, with the route, an empty list is the push command
    page.unroute(re.compile(r".*/v1/datasets$"))
    page.reload()
    expect(page.locator("#dataset-hint")).to_contain_text("slimtrain dataset push FILE NAME")

"""A model plugin trained through the service, as an operator deploys one: the test-local package
tests/plugins_pkg (entry point `toy_mlp` in the `slimtrain.models` group) is pip-installed into
the environment that the API, the Ray job's driver and its Ray Train workers all run from (this
venv: the session's Ray head was started from it), a job naming the plugin's model is submitted to
a live API process on the session's real Ray head, and its report and exported artifacts are
checked. A model name that is neither built in nor installed is refused at POST.

The package is uninstalled afterwards, so the unit test that a name is unknown without the plugin
(tests/unit/test_model_plugins.py) still holds; the API runs as its own process so that this
process's cached plugin list (service.catalog.model_plugins) never sees the plugin."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.artifact_reading import onnx_weight_zeros
from tests.conftest import ROOT, wait_for
from tests.plugins.faults import TERMINAL, api_env, start_api
from tests.plugins.server import ApiProcess

pytestmark = pytest.mark.integration

TOKEN = "plugin-tenant-0123456789ab"
PIP = [sys.executable, "-m", "pip"]
SPEC = {
    "name": "plugin-toy-mlp",
    "model": {"name": "toy_mlp", "args": {"hidden": 24}},
    "data": {"name": "digits"},
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.1, "seed": 0},
    "parallel": {"workers": 1},
    "precision": "fp32",
    "compression": {"pruning": {"final_sparsity": 0.5, "start_step": 5, "end_step": 40, "frequency": 5}},
    "checkpoint": {"every_steps": 1000},
}


def _uninstall() -> None:
    subprocess.run([*PIP, "uninstall", "--yes", "--quiet", "slimtrain-toyplugin"], timeout=120)


@pytest.fixture(scope="module")
def plugin_installed(tmp_path_factory) -> Iterator[None]:
    # Built from a copy, so the build's leftovers stay out of the source tree.
    src = tmp_path_factory.mktemp("plugin") / "src"
    shutil.copytree(ROOT / "tests" / "plugins_pkg", src)
    cmd = [*PIP, "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation", str(src)]
    subprocess.run(cmd, check=True, timeout=300)
    try:
        yield
    finally:
        _uninstall()


@pytest.fixture(scope="module")
def api(plugin_installed, ray_cluster, tmp_path_factory) -> Iterator[ApiProcess]:
    server = start_api(api_env(tmp_path_factory.mktemp("plugin-api"), ray_cluster, {TOKEN: "plugins"}))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http(api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        yield c


def test_a_model_in_neither_the_registry_nor_a_plugin_is_refused_at_post(http):
    r = http.post("/v1/jobs", json={**SPEC, "model": {"name": "toy_mlp_v2"}})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "model.name" in message and "toy_mlp_v2" in message
    # the installed plugin is among the names the error offers
    assert "toy_mlp" in message.replace("toy_mlp_v2", "")
    assert http.get("/v1/jobs").json()["items"] == []


def test_the_plugins_model_trains_through_the_service_and_exports_verified(api, http):
    r = http.post("/v1/jobs", json=SPEC)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job = wait_for(
        lambda: (j := http.get(f"/v1/jobs/{job_id}").json())["state"] in TERMINAL and j,
        300,
        0.5,
        f"{job_id} finished",
    )
    assert job["state"] == "succeeded", (job, http.get(f"/v1/jobs/{job_id}/logs").text[-4000:])

    report = http.get(f"/v1/jobs/{job_id}/report").json()
    assert report["model"] == "toy_mlp"
    assert report["sparsity"]["global"] == pytest.approx(0.5, abs=0.01)
    assert report["accuracy"] >= 0.85

    # every shipped file is the one the manifest names, byte for byte
    manifest = http.get(f"/v1/jobs/{job_id}/artifacts/manifest.json").json()["files"]
    blobs = {}
    for name in ("model.safetensors", "model.onnx", "report.json"):
        blobs[name] = http.get(f"/v1/jobs/{job_id}/artifacts/{name}").content
        assert hashlib.sha256(blobs[name]).hexdigest() == manifest[name]["sha256"], name

    # the exported graph is the plugin's two layers, pruned, and it classifies raw digits itself
    zeros = onnx_weight_zeros(blobs["model.onnx"])
    assert len(zeros) == 2
    z, n = map(sum, zip(*zeros.values(), strict=True))
    assert z / n == pytest.approx(0.5, abs=0.01)
    from sklearn.datasets import load_digits

    digits = load_digits()
    session = ort.InferenceSession(blobs["model.onnx"], providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: digits.data.astype(np.float32)}
    predicted = session.run(None, feed)[0].argmax(1)
    assert (predicted == digits.target).mean() >= 0.85

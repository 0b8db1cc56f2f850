"""The dashboard's server side over real HTTP (uvicorn on loopback; the Ray cluster is the
stand-in, it is not what these tests are about): the page and its files, their security headers,
the spec routes the page reads, and that every file the page loads exists and ships."""

from __future__ import annotations

import hashlib
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.routes.dashboard import DASHBOARD_DIR, EXAMPLES_DIR
from service.settings import Settings
from service.spec import load_spec_text
from tests.conftest import ROOT
from tests.plugins.fake_ray import FakeRay
from tests.plugins.server import serve_app

pytestmark = pytest.mark.integration

TOKEN = "dashboard-routes-token-0123456789"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    settings = Settings(data_dir=data, api_tokens=f"{TOKEN}:t")
    with serve_app(create_app(settings, ray=FakeRay())) as base:
        yield base


def test_the_page_is_public_and_locked_down(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert '<script type="module" src="/dashboard/js/main.js">' in r.text
    js = httpx.get(url + "/dashboard/js/main.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert httpx.get(url + "/dashboard/../service/settings.py").status_code == 404
    assert httpx.get(url + "/dashboard/js/nope.js").status_code == 404


def test_spec_routes_need_the_token(url):
    for path in ("/v1/spec/examples", "/v1/spec/schema"):
        r = httpx.get(url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_examples_are_the_repository_specs_and_all_valid(url):
    r = httpx.get(url + "/v1/spec/examples", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    items = r.json()["items"]
    assert [e["name"] for e in items] == sorted(p.stem for p in EXAMPLES_DIR.glob("*.yaml"))
    gmp = next(e for e in items if e["name"] == "digits-gmp90")
    assert gmp["text"] == (EXAMPLES_DIR / "digits-gmp90.yaml").read_text()
    assert gmp["title"].startswith("Gradual magnitude pruning to 90%")
    for e in items:
        load_spec_text(e["text"])  # raises on an example the API would refuse


def test_schema_is_the_job_spec_schema(url):
    schema = httpx.get(url + "/v1/spec/schema", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert set(schema["required"]) == {"name", "model", "data"}
    assert {"train", "parallel", "compression"} <= set(schema["properties"])


def _page_files() -> set[str]:
    """Every file the page loads: index.html's links and scripts, then the ES module imports."""
    html = (DASHBOARD_DIR / "index.html").read_text()
    todo = [u.removeprefix("/dashboard/") for u in re.findall(r'(?:src|href)="(/dashboard/[^"]+)"', html)]
    seen: set[str] = set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        path = DASHBOARD_DIR / rel
        assert path.is_file(), f"the page loads {rel}, which does not exist"
        if rel.endswith(".js") and not rel.startswith("vendor/"):
            for imp in re.findall(r'^import .*? from "(\.[^"]+)";$', path.read_text(), re.M | re.S):
                todo.append(str((path.parent / imp).resolve().relative_to(DASHBOARD_DIR)))
    return seen


def test_every_file_the_page_loads_exists_and_ships_with_the_package():
    files = _page_files()
    assert {"js/main.js", "js/pages/job.js", "vendor/uplot.esm.js", "vendor/yaml.esm.js"} <= files
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["api"]
    for rel in files | {"index.html", "vendor/LICENSE.uplot", "vendor/LICENSE.yaml"}:
        assert any(fnmatch(f"dashboard/{rel}", g) and rel.count("/") == g.count("/") - 1 for g in globs), rel


def test_vendored_libraries_match_their_recorded_build():
    vendor = DASHBOARD_DIR / "vendor"
    for line in (vendor / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    # Served from the repository only: no file the page loads points at another origin.
    for rel in _page_files():
        text = Path(DASHBOARD_DIR / rel).read_text()
        assert not re.search(r"""(?:src|href|import[^"']*from)\s*=?\s*["']https?://""", text), rel

"""`/docs` works without the internet: the page loads Swagger UI from this origin only, and the
vendored files it names are served, whole, with the right content types."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.routes.docs import ASSETS_DIR
from service.settings import Settings
from tests.plugins.fake_ray import FakeRay

TOKEN = "docs-token-0123456789abcdef"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    data = tmp_path_factory.mktemp("docs")
    settings = Settings(data_dir=data, api_tokens=f"{TOKEN}:t", run_scheduler=False)
    return TestClient(create_app(settings, ray=FakeRay()))


def asset_urls(html: str) -> list[str]:
    """Every URL the page loads or links: src/href attributes and the strings its script passes
    to Swagger UI (the OpenAPI document's url)."""
    attrs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    script = re.findall(r"""\burl\s*:\s*["']([^"']+)["']""", html)
    return attrs + script


def test_docs_page_references_only_same_origin_urls(client):
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = asset_urls(r.text)
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls), urls
    assert any(u.endswith("swagger-ui.css") for u in urls), urls
    assert "/openapi.json" in urls
    for u in urls:
        assert u.startswith("/") and not u.startswith("//"), f"{u} is not on this origin"
    assert "cdn" not in r.text.lower() and "https://" not in r.text
    # Swagger UI's validator badge would send the document to an online service
    assert '"validatorUrl": null' in r.text


@pytest.mark.parametrize(
    ("suffix", "content_type"),
    [(".js", "text/javascript"), (".css", "text/css"), (".png", "image/png")],
)
def test_the_assets_it_names_are_served(client, suffix, content_type):
    html = client.get("/docs").text
    (url,) = [u for u in asset_urls(html) if u.endswith(suffix)]
    r = client.get(url)
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] == content_type
    name = url.rsplit("/", 1)[1]
    assert r.content == (ASSETS_DIR / name).read_bytes()


def test_vendored_files_match_their_checksums():
    for line in (ASSETS_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((ASSETS_DIR / name).read_bytes()).hexdigest() == digest, name
    bundle = (ASSETS_DIR / "swagger-ui-bundle.js").read_text()
    # the self-contained bundle (the page calls SwaggerUIBundle), with no source map to fetch
    assert "SwaggerUIBundle" in bundle and "sourceMappingURL" not in bundle[-500:]


def test_only_the_page_files_are_served_and_redoc_is_off(client):
    for name in ("build.sh", "package.json", "README.md", "SHA256SUMS", "..%2Fapp.py"):
        assert client.get(f"/docs/assets/{name}").status_code == 404, name
    assert client.get("/redoc").status_code == 404
    # the OpenAPI document the page reads is still served, and does not list the page itself
    paths = client.get("/openapi.json").json()["paths"]
    assert "/docs" not in paths and not any(p.startswith("/docs/") for p in paths)


def test_assets_are_package_data():
    """A wheel carries the files: pyproject's package-data names them."""
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        pattern = f"docs_assets/*{Path(name).suffix}"
        assert pattern in text, f"{pattern} missing from [tool.setuptools.package-data]"

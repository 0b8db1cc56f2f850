"""`slimtrain serve` moves what is alive once the app has started out of the cyclic garbage
collector's reach (api.app.create_app: freeze_gc); an app that shares its process does not."""

from __future__ import annotations

import gc

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import api.app
from api.app import create_app
from api.cli import app as cli
from service.settings import Settings, get_settings
from tests.plugins.fake_ray import FakeRay


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, api_tokens="gc-token-0123456789abcdef:t", run_scheduler=False)


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the suite's garbage stays collectable


def test_an_app_with_freeze_gc_freezes_what_is_alive_once_started(settings, unfrozen):
    app = create_app(settings, ray=FakeRay(), freeze_gc=True)
    assert gc.get_freeze_count() == 0  # not before start-up: the lifespan creates more
    with TestClient(app) as client:
        frozen = gc.get_freeze_count()
        assert frozen > 1000, frozen  # modules, the app, its routes: far more than a handful
        assert client.get("/healthz").status_code == 200


def test_an_app_that_shares_its_process_freezes_nothing(settings, unfrozen):
    with TestClient(create_app(settings, ray=FakeRay())) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() == 0


@pytest.fixture
def fresh_settings():
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_serve_builds_its_app_with_freeze_gc(settings, monkeypatch, unfrozen, fresh_settings, tmp_path):
    made, served = [], []
    real = api.app.create_app

    def spy(*args, **kwargs):
        made.append(kwargs)
        return real(*args, ray=FakeRay(), **{k: v for k, v in kwargs.items() if k != "ray"})

    monkeypatch.setattr(api.app, "create_app", spy)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: served.append(app))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SLIMTRAIN_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("SLIMTRAIN_API_TOKENS", "gc-token-0123456789abcdef:t")
    # a cluster's address: serve starts no embedded Ray head
    monkeypatch.setenv("SLIMTRAIN_RAY_ADDRESS", "127.0.0.1:9")
    result = CliRunner().invoke(cli, ["serve"])
    assert result.exit_code == 0, result.output
    assert made == [{"auth": made[0]["auth"], "freeze_gc": True}]
    assert len(served) == 1

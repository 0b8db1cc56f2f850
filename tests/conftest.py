"""Shared fixtures. Real infrastructure: one Ray head per test session (started with
`ray start --head`, token auth on, loopback only), local artifact folders under tmp_path."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.raycluster import free_port, start_head  # noqa: F401  (free_port is re-exported)

# Fixture modules for real servers (PostgreSQL, S3, uvicorn, browser) live in tests/plugins/,
# one per piece of infrastructure; add yours to this list.
pytest_plugins: list[str] = [
    "tests.plugins.s3",
    "tests.plugins.postgres",
    "tests.plugins.server",
    "tests.plugins.fake_ray",
    "tests.plugins.browser",
    "tests.plugins.live_api",
]

ROOT = Path(__file__).resolve().parent.parent
# Ray's token auth stays on in tests, as in production; set before anything imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray head for the whole session (token auth on, loopback, its own ports):
    {"address", "dashboard_url"}; this process is connected to it as a driver."""
    import ray

    head = start_head(num_cpus=2, tag="session")
    try:
        ray.init(address=head.address, log_to_driver=True)
        yield {"address": head.address, "dashboard_url": head.dashboard_url}
    finally:
        ray.shutdown()
        head.stop()


@pytest.fixture
def cli_width(monkeypatch):
    """Draws the CLI's output at `cli_width(n)` columns for the rest of the test. The CLI's rich
    consoles take COLUMNS once, when api.cli_common is imported: where it was set then
    (pytest-xdist's workers have COLUMNS=80), an invocation's COLUMNS cannot widen them. Rich
    keeps that width in `_width` (None: follow the terminal); the `width` property's setter
    would leave a fixed width behind when monkeypatch restores it."""
    from api import cli_common

    def set_width(columns: int) -> None:
        for console in (cli_common.out, cli_common.console):
            monkeypatch.setattr(console, "_width", columns)

    return set_width


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pytest_collection_modifyitems(config, items):
    """Group the suite for `pytest -n N --dist loadgroup` (how `make test` runs it): every test of
    a module that uses the session's Ray head runs in one worker process, which starts that head
    once and keeps jobs on it one at a time as without workers; every other module is a group of
    its own, so a module's fixtures are built once. Without xdist the markers do nothing."""
    on_session_head = {item.module.__name__ for item in items if "ray_cluster" in item.fixturenames}
    for item in items:
        module = item.module.__name__
        group = "session-ray-head" if module in on_session_head else module
        item.add_marker(pytest.mark.xdist_group(group))

"""Shared fixtures. Real infrastructure: one Ray head per test session (started with
`ray start --head`, token auth on, loopback only), local artifact folders under tmp_path."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Ray's token auth stays on in tests, as in production; set before anything imports ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real Ray head for the whole session: {"address", "dashboard_url"}; this process is
    connected to it as a driver."""
    import ray

    temp = Path("/tmp") / f"slimtrain-ray-{os.getpid()}"
    gcs_port, dash_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--port={gcs_port}",
        f"--dashboard-port={dash_port}",
        "--dashboard-host=127.0.0.1",
        "--node-ip-address=127.0.0.1",
        "--include-dashboard=true",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    address = f"127.0.0.1:{gcs_port}"
    try:
        ray.init(address=address, log_to_driver=True)
        yield {"address": address, "dashboard_url": f"http://127.0.0.1:{dash_port}"}
    finally:
        ray.shutdown()
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")

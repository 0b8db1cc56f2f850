"""`slimtrain serve` as the load bench's subject: a real process with its embedded Ray head on
loopback (Ray's token auth on, as `serve` always runs it), a temporary data dir and one API token;
plus the sampler of its memory."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.load import gc_pauses
from tests.plugins.server import wait_ready
from tests.raycluster import free_port

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


@dataclass
class Server:
    url: str
    token: str
    proc: subprocess.Popen
    log_path: Path
    gc_path: Path  # its garbage-collector pauses (bench/load/gc_pauses.py)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def metrics_token(self) -> str:
        """What Prometheus would send to /metrics (docs/security.md): never an API token."""
        return f"prometheus-{self.token}"


@contextlib.contextmanager
def serve(
    data_dir: Path, token: str, ready_timeout: float = 180, database_url: str | None = None
) -> Iterator[Server]:
    """`database_url`: the API's database (default: SQLite in `data_dir`)."""
    port = free_port()
    gc_path = data_dir / "gc_pauses.txt"
    env = {
        **os.environ,
        "SLIMTRAIN_DATA_DIR": str(data_dir),
        "SLIMTRAIN_API_TOKENS": f"{token}:load",
        "SLIMTRAIN_METRICS_TOKEN": f"prometheus-{token}",
        "SLIMTRAIN_PORT": str(port),
        # The default 8265 may be taken by another Ray on this machine (the test suites).
        "SLIMTRAIN_RAY_DASHBOARD_PORT": str(free_port()),
        gc_pauses.ENV: str(gc_path),
        **({"SLIMTRAIN_DATABASE_URL": database_url} if database_url else {}),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(gc_pauses.HOOK_DIR), str(ROOT), os.environ.get("PYTHONPATH")) if p
        ),
    }
    log_path = data_dir / "server.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", token, proc, log_path, gc_path)
    try:
        wait_ready(server.url, ready_timeout, proc)
        yield server
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (serve shuts its Ray head down), then SIGKILL for any of its own descendants that
    outlive it: only processes this bench started, by pid."""
    if proc.poll() is not None:
        return
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    _gone, alive = psutil.wait_procs(family, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def sample(pid: int) -> dict:
    """The API process's own memory, threads and file descriptors (not its Ray children's)."""
    # The same Process object each time: its cpu_percent is measured since its previous call.
    p = _procs.get(pid) or _procs.setdefault(pid, psutil.Process(pid))
    with p.oneshot():
        return {
            "t": time.monotonic(),
            "rss_mib": p.memory_info().rss / MIB,
            "cpu_percent": p.cpu_percent(None),  # 100 = one core, since the previous sample
            "threads": p.num_threads(),
            "fds": p.num_fds(),
        }


_procs: dict[int, psutil.Process] = {}

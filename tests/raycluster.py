"""Start and stop a private Ray head for tests. Several can run at once on one machine: every
port is chosen free, and stopping kills only this cluster's processes (never `ray stop`, which
would take down every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    address: str
    dashboard_url: str
    temp_dir: Path
    ports: dict[str, int] = field(default_factory=dict)  # pass to start_head to restart it here

    def stop(self) -> None:
        kill_tree(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(
    num_cpus: int = 2, tag: str = "t", env: dict | None = None, ports: dict[str, int] | None = None
) -> RayHead:
    """`ports`: a stopped head's `ports`, to bring a new head up on the same address.

    A port chosen free can be taken before Ray binds it (by another head starting in another
    test process, or any of the ports Ray's own workers open): a head on ports we chose is
    retried on fresh ones, and the last failure says what `ray start` printed."""
    tries = 1 if ports else 3
    for attempt in range(tries):
        try:
            return _start_head(num_cpus, tag, env, ports)
        except RuntimeError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _start_head(num_cpus: int, tag: str, env: dict | None, ports: dict[str, int] | None) -> RayHead:
    temp = Path("/tmp") / f"stray-{tag}-{os.getpid()}-{free_port()}"
    ports = (
        dict(ports)
        if ports
        else {
            "--port": free_port(),
            "--dashboard-port": free_port(),
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
    )
    gcs, dash = ports["--port"], ports["--dashboard-port"]
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--include-dashboard=true",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *[f"{k}={v}" for k, v in ports.items()],
    ]
    run_env = {k: v for k, v in (env or os.environ).items() if k != "RAY_ADDRESS"}
    run_env.setdefault("RAY_AUTH_MODE", "token")
    # imported here: conftest imports this module before it sets RAY_AUTH_MODE, and ray must not
    # be imported before that
    from workers.ray_runtime import LOCAL_ONLY_ENV, bind_loopback, ensure_private_ray_token

    # Loopback only, as slimtrain's own embedded head (workers/ray_runtime.py says why), and a
    # token file only its owner can read. This process (a driver of the head) and the servers and
    # CLIs it starts must keep 127.0.0.1 as 127.0.0.1 too, or Ray sends them to the external
    # address, where this head does not listen.
    run_env[LOCAL_ONLY_ENV] = "0"
    bind_loopback()
    ensure_private_ray_token(run_env)
    done = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=180)
    if done.returncode:
        kill_tree(temp)  # whatever it started before failing
        shutil.rmtree(temp, ignore_errors=True)
        raise RuntimeError(f"`ray start --head` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", temp, ports)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def kill_tree(marker: Path) -> None:
    """SIGKILL every process whose command line names `marker`, and all their descendants."""
    roots = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(marker).encode() in (d / "cmdline").read_bytes():
                    roots.append(int(d.name))
            except OSError:
                continue
    kids, todo, seen = _children(), list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid == os.getpid():
            continue
        seen.add(pid)
        todo.extend(kids.get(pid, []))
    for pid in seen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)

"""Connecting to Ray: an existing cluster, or an embedded local head bound to loopback with
Ray's token authentication on (the unauthenticated Jobs API was CVE-2023-48022)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

import ray

log = logging.getLogger(__name__)

# Ray 2.60 turns a node address of 127.0.0.1 into the machine's external address (so that other
# nodes can join), and the GCS, raylet, workers and agents bind to the node address, or to every
# interface. With multi-node clusters off (Ray's own default on macOS and Windows) the address
# stays 127.0.0.1 and every one of them listens on loopback only; the flag only stops `ray start
# --address` from adding a node to this head, which an embedded head never wants.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def bind_loopback() -> None:
    """Make the Ray head this process starts (and its children: raylet, workers, job drivers)
    use 127.0.0.1 as the node address, and keep 127.0.0.1 as it is when this process (or its
    children) connects to a head: Ray also rewrites a loopback address a driver connects to."""
    os.environ[LOCAL_ONLY_ENV] = "0"
    # ray_constants read the variable when Ray was imported, before this call.
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _is_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rpartition(":")[0].strip("[]") or address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ray_token_file(env: Mapping[str, str] | None = None) -> Path | None:
    """The token file Ray reads in a process with environment `env` (default: this one's), or
    None when the token comes from RAY_AUTH_TOKEN."""
    env = os.environ if env is None else env
    if env.get("RAY_AUTH_TOKEN"):
        return None
    if custom := env.get("RAY_AUTH_TOKEN_PATH"):
        return Path(custom).expanduser()
    # Ray's default location (ray._private.authentication.authentication_token_setup).
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    return home / ".ray" / "auth_token"


def ensure_private_ray_token(env: Mapping[str, str] | None = None) -> Path | None:
    """Create the embedded head's token file before Ray does: Ray writes it with the umask's
    mode (0644 in a 0755 ~/.ray), readable by every local user, and the token opens the cluster.
    Ours is 0600 in a 0700 directory; an existing one readable by others is narrowed to 0600."""
    path = ray_token_file(env)
    if path is None:
        return None
    if not path.exists():
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: narrow theirs below
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # what Ray's own generator writes
            return path
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        try:
            path.chmod(0o600)
        except OSError as e:  # e.g. a read-only mounted secret: say so, do not refuse to run
            log.warning(
                "Ray token file %s is readable by others (%o) and cannot be narrowed: %s", path, mode, e
            )
        else:
            log.warning("Ray token file %s was readable by others (%o); narrowed to 0600", path, mode)
    return path


def require_token_auth() -> None:
    """Turn Ray's token authentication on for this process and its children, or refuse to run
    when someone turned it off. Ray enables it by default only for clusters it starts itself;
    a driver joining a cluster needs the mode set explicitly to send its token."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is None:
        os.environ["RAY_AUTH_MODE"] = "token"
        # Ray caches its config at import; refresh it as Ray's own token setup does.
        from ray._raylet import Config

        Config.initialize("")
    elif mode.lower() != "token":
        raise RuntimeError(f"RAY_AUTH_MODE={mode}: slimtrain never runs Ray without token auth")


def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    log_to_driver: bool = True,
    include_dashboard: bool = False,
    dashboard_port: int = 8265,
) -> None:
    if ray.is_initialized():
        return
    require_token_auth()
    if address:
        if _is_loopback(address):
            bind_loopback()  # else Ray dials the external address, where a loopback head is not
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    bind_loopback()
    ensure_private_ray_token()
    ray.init(
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=include_dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=log_to_driver,
    )


def lower_head_priority(nice: int) -> int:
    """Give the embedded head's raylet, and every process it has started, a niceness of at least
    `nice`; the processes it starts later (job drivers, Ray's workers) inherit it. Ray starts its
    workers 15 above their parent (Ray's `worker_niceness`) but its job drivers at the raylet's.
    The head shares the machine with this process, the API: the API's requests then come before
    training when both want a core, and training still gets every cycle the API leaves idle
    (bench/README, "Load and soak"). Returns how many processes were looked at.

    Linux keeps a niceness per thread, and a thread or process inherits its creator's: each
    thread of each process is set, the raylet's before its children are listed, so that nothing
    it forks meanwhile is missed. A thread already nicer is left as it is: raising a priority
    needs privileges. A process that exits meanwhile is skipped; where the system refuses even
    lowering one (a sandbox's seccomp policy), it stops there with a warning."""
    if nice <= 0:
        return 0
    import psutil

    raylets = [p for p in psutil.Process().children() if _name(p) == "raylet"]
    if not raylets:
        log.warning("no raylet among this process's children: the Ray head keeps its priority")
    looked_at = 0
    try:
        for raylet in raylets:
            # The raylet before listing what it has started: a child it forks meanwhile either
            # inherits the new niceness or is in the listing.
            looked_at += _at_least(raylet, nice)
            for proc in _descendants(raylet):
                looked_at += _at_least(proc, nice)
    except PermissionError as e:  # a sandbox that forbids it: the rest keeps the API's priority
        log.warning("could not lower the Ray head's priority: %s", e)
    return looked_at


def _at_least(proc, nice: int) -> int:
    """1 once every thread of `proc` has a niceness of at least `nice`; 0 if it has exited."""
    import psutil

    try:
        threads = proc.threads()
    except psutil.NoSuchProcess:
        return 0
    for thread in threads:
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            if os.getpriority(os.PRIO_PROCESS, thread.id) < nice:
                os.setpriority(os.PRIO_PROCESS, thread.id, nice)
    return 1


def _name(proc) -> str:
    import psutil

    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return ""


def _descendants(proc) -> list:
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []

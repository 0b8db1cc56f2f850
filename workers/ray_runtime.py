"""Connecting to Ray: an existing cluster, or an embedded local head bound to loopback with
Ray's token authentication on (the unauthenticated Jobs API was CVE-2023-48022)."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


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
        ray.init(address=address, log_to_driver=log_to_driver)
        return
    ray.init(
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=include_dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=log_to_driver,
    )

"""A local-folder artifact store across Ray nodes.

Training workers write checkpoints into the job's artifact store, and the driver reads them
back to resume and export. A local folder (the zero-configuration default, `file://...`) is
only that when every node that can host a worker sees the same folder: one machine, or a shared
filesystem mounted at the same path everywhere. Otherwise each worker node writes into its own
disk, and a resume or export on the head finds nothing (or another node's stale files). So the
driver checks before any worker starts: it writes a marker file into the store and asks one
zero-CPU task on every other node whether it reads the same marker. A node that does not fails
the job with a ConfigError naming the nodes and what to set instead. One node: nothing to do.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from service.artifacts import ArtifactStore, LocalArtifactStore
from service.errors import ConfigError

CHECK_TIMEOUT_S = 60.0


def worker_nodes_elsewhere(nodes: list[dict], here: str) -> list[dict]:
    """The alive nodes of `ray.nodes()` other than `here` that can host training workers."""
    return [
        n
        for n in nodes
        if n.get("Alive")
        and n["NodeID"] != here
        and (n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)
    ]


def blind_nodes_error(store_uri: str, blind: list[str]) -> ConfigError:
    return ConfigError(
        f"artifact store {store_uri} is a local folder that the Ray worker node(s) "
        f"{', '.join(blind)} do not see: checkpoints written there would stay on each node. "
        "Set SLIMTRAIN_ARTIFACT_URI=s3://bucket/prefix (with SLIMTRAIN_S3_ENDPOINT_URL for "
        "MinIO) on the API and the Ray head, or mount one shared folder at the same path on "
        "every node"
    )


def _reads_marker(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def check_store_shared(store: ArtifactStore) -> None:
    """Raise ConfigError when `store` is a local folder that a worker node cannot see."""
    if not isinstance(store, LocalArtifactStore):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    others = worker_nodes_elsewhere(ray.nodes(), ray.get_runtime_context().get_node_id())
    if not others:
        return
    token = secrets.token_hex(16)
    marker = store.root / f".node-check-{token}"
    marker.write_text(token)
    try:
        probe = ray.remote(num_cpus=0, max_retries=0)(_reads_marker)
        refs = [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(marker), token
            )
            for n in others
        ]
        seen = ray.get(refs, timeout=CHECK_TIMEOUT_S)
    finally:
        marker.unlink(missing_ok=True)
    blind = [n.get("NodeManagerAddress") or n["NodeID"] for n, ok in zip(others, seen, strict=True) if not ok]
    if blind:
        raise blind_nodes_error(store.uri, blind)

"""The multi-node check of a local-folder artifact store (workers/store_check.py): which nodes it
asks, and what it tells the user. The check against real nodes that do not share the folder runs
in the deployment test (deploy/test-deploy.sh), where the Ray workers are other containers."""

from service.artifacts import LocalArtifactStore
from service.errors import ConfigError
from workers.store_check import _reads_marker, blind_nodes_error, check_store_shared, worker_nodes_elsewhere


def node(node_id, alive=True, cpu=1.0, gpu=0.0):
    res = {k: v for k, v in (("CPU", cpu), ("GPU", gpu)) if v}
    return {"NodeID": node_id, "Alive": alive, "Resources": res, "NodeManagerAddress": f"10.0.0.{node_id}"}


def test_only_other_alive_nodes_that_can_host_workers_are_asked():
    nodes = [
        node("1"),  # the driver's
        node("2"),
        node("3", alive=False),
        node("4", cpu=0.0),  # a head with --num-cpus=0 hosts no worker
        node("5", cpu=0.0, gpu=1.0),
    ]
    assert [n["NodeID"] for n in worker_nodes_elsewhere(nodes, here="1")] == ["2", "5"]
    assert worker_nodes_elsewhere([node("1")], here="1") == []


def test_the_error_names_the_nodes_and_the_setting():
    err = blind_nodes_error("file:///data/artifacts", ["10.0.0.2", "10.0.0.5"])
    assert isinstance(err, ConfigError)
    assert "10.0.0.2, 10.0.0.5" in err.message
    assert "file:///data/artifacts" in err.message
    assert "SLIMTRAIN_ARTIFACT_URI=s3://" in err.message


def test_the_probe_reads_the_marker_or_says_no(tmp_path):
    marker = tmp_path / "m"
    assert not _reads_marker(str(marker), "t")
    marker.write_text("t")
    assert _reads_marker(str(marker), "t")
    assert not _reads_marker(str(marker), "other")


def test_a_store_that_is_not_a_local_folder_is_not_checked():
    class Remote:  # anything but a LocalArtifactStore: no Ray call is made
        pass

    check_store_shared(Remote())
    assert not isinstance(Remote(), LocalArtifactStore)

"""Where a job's Ray Train ranks ran: the Ray nodes of the cluster and the `RayTrainWorker`
actors of the Ray job submitted as SUBMISSION_ID (slimtrain's job id), each with its node id.
Run on the Ray head (the test runs it inside the ray-head container, where the cluster's token
is in RAY_AUTH_TOKEN_PATH); prints JSON.

    python ray_placement.py SUBMISSION_ID
"""

import json
import sys

from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors, list_nodes

DASHBOARD = "http://127.0.0.1:8265"


def main() -> int:
    submission_id = sys.argv[1]
    info = JobSubmissionClient(DASHBOARD).get_job_info(submission_id)
    nodes = [
        {"node_id": n.node_id, "ip": n.node_ip, "head": n.is_head_node, "state": n.state}
        for n in list_nodes(address=DASHBOARD, limit=1000)
    ]
    actors = list_actors(
        address=DASHBOARD,
        filters=[("class_name", "=", "RayTrainWorker"), ("job_id", "=", info.job_id)],
        detail=True,
        limit=1000,
    )
    workers = [{"actor_id": a.actor_id, "node_id": a.node_id, "state": a.state, "pid": a.pid} for a in actors]
    print(json.dumps({"ray_job_id": info.job_id, "nodes": nodes, "workers": workers}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The deployment test (`make test-deploy`): builds the images, brings up docker-compose.yml with
# the test override deploy/compose.test.yaml (API, Ray head, two CPU Ray worker containers,
# PostgreSQL and S3 stand-ins), and through the API's published port, with the CLI:
#   1. submits a 2-worker DDP job and follows it to `succeeded` over the API's event stream
#      (live metrics counted on the way);
#   2. asserts from Ray's state API that its two ranks ran on the two worker containers' nodes;
#   3. verifies every artifact and every checkpoint in the bucket itself against the manifests;
#   3b. checks that a local-folder artifact store is refused when workers run on other nodes;
#   4. submits a longer job, kills one worker container after its first checkpoint (and starts
#      it again), restarts the API container: the job resumes from its checkpoint in a new
#      attempt (its own Ray job) and succeeds;
#   5. `down` / `up` with the same volumes: both jobs are still there: their records
#      (PostgreSQL's volume), every artifact and checkpoint in the bucket (the S3 stand-in's
#      volume), and the first job's report, unchanged;
# then tears everything down (volumes included). Prints each phase's duration.
#
# Environment:
#   ENGINE=podman|docker     default: podman if installed, else docker
#   PYTHON_IMAGE, DEBIAN_IMAGE  base images; default: the localhost/ ones that
#                            ../shared/tools/container-engine.sh builds when present, else the official
#   TORCH_WHEEL              torch CPU wheel for the Ray image (default: /opt/wheels/torch-*+cpu-*.whl
#                            when present; otherwise the image downloads the locked CPU build)
#   SKIP_BUILD=1             use the images already built
#   KEEP=1                   leave the stack up at the end (tear down with the printed command)
#   SLIMTRAIN_CLI            the CLI to drive the API with (default: .venv/bin/slimtrain)
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
phase_start=$T0
phase() { local now; now=$(date +%s); echo "== [$((now - T0))s, previous phase $((now - phase_start))s] $*"; phase_start=$now; }
die() { echo "FAIL: $*" >&2; exit 1; }

ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}
if [ "$ENGINE" = podman ]; then COMPOSE=(podman-compose) FORMAT_ARG=--format=docker; else COMPOSE=(docker compose) FORMAT_ARG=; fi
exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }
PYTHON_IMAGE=${PYTHON_IMAGE:-$(exists localhost/python:3.11-slim-bookworm && echo localhost/python:3.11-slim-bookworm || echo python:3.11-slim-bookworm)}
DEBIAN_IMAGE=${DEBIAN_IMAGE:-$(exists localhost/debian:bookworm && echo localhost/debian:bookworm || echo debian:bookworm-slim)}
CLI=${SLIMTRAIN_CLI:-.venv/bin/slimtrain}
PROJECT=slimtrain-test
API_IMAGE=slimtrain-api:0.1.0
RAY_IMAGE=slimtrain-ray:0.1.0-cpu
PG_IMAGE=slimtrain-test-postgres:15
S3_IMAGE=slimtrain-test-s3:0.1.0
BUCKET=slimtrain

work=$(mktemp -d)
SECRETS=deploy/.test-secrets
C=("${COMPOSE[@]}" --profile cpu -p "$PROJECT" -f docker-compose.yml -f deploy/compose.test.yaml --env-file "$work/env")
teardown() {
  local rc=$?
  if [ "${KEEP:-0}" = 1 ]; then
    echo "stack left up; tear down with: ${C[*]} down -v   (env file $work/env)"
  else
    if [ $rc -ne 0 ]; then
      echo "---- logs (last 60 lines per service) ----"
      for s in api ray-head ray-worker-cpu postgres minio; do
        for id in $(cids "$s"); do echo "-- $s $id"; "$ENGINE" logs --tail 60 "$id" 2>&1 || true; done
      done
    fi
    "${C[@]}" down -v -t 5 >/dev/null 2>&1 || true
    rm -rf "$work" "$SECRETS"
  fi
  phase "done (exit $rc); total $(( $(date +%s) - T0 ))s"
}
# containers of one compose service, by the labels both docker compose and podman-compose set
cids() { "$ENGINE" ps -a -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1"; }
cid() { local ids; ids=$(cids "$1"); [ -n "$ids" ] || die "no container for service $1"; echo "$ids" | head -1; }
wait_for() { # wait_for SECONDS WHAT CMD...
  local limit=$1 what=$2 i; shift 2
  for ((i = 0; i < limit; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  die "$what: not within ${limit}s"
}
trap teardown EXIT

# ---- secrets and settings (fresh for every run; readable by the containers' users) ----
mkdir -p "$SECRETS"
hex() { python3 -c 'import secrets; print(secrets.token_hex(24))'; }
for s in ray_auth_token postgres_password grafana_admin_password metrics_token; do hex > "$SECRETS/$s"; done
chmod 755 "$SECRETS"; chmod 644 "$SECRETS/"*
API_TOKEN=$(hex)
API_PORT=${SLIMTRAIN_API_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
cat > "$work/env" <<ENV
POSTGRES_USER=slimtrain
POSTGRES_DB=slimtrain
POSTGRES_PASSWORD=$(cat "$SECRETS/postgres_password")
MINIO_ROOT_USER=minio-admin
MINIO_ROOT_PASSWORD=$(hex)
AWS_ACCESS_KEY_ID=slimtrain
AWS_SECRET_ACCESS_KEY=$(hex)
AWS_DEFAULT_REGION=us-east-1
SLIMTRAIN_BUCKET=$BUCKET
RAY_AUTH_TOKEN=$(cat "$SECRETS/ray_auth_token")
SLIMTRAIN_API_TOKENS=$API_TOKEN:default
SLIMTRAIN_METRICS_TOKEN=$(cat "$SECRETS/metrics_token")
GRAFANA_ADMIN_PASSWORD=$(cat "$SECRETS/grafana_admin_password")
SLIMTRAIN_API_PORT=$API_PORT
SLIMTRAIN_API_IMAGE=$API_IMAGE
SLIMTRAIN_RAY_IMAGE=$RAY_IMAGE
SLIMTRAIN_TEST_POSTGRES_IMAGE=$PG_IMAGE
SLIMTRAIN_TEST_S3_IMAGE=$S3_IMAGE
ENV
phase "engine $ENGINE ($("$ENGINE" --version)); base images $PYTHON_IMAGE, $DEBIAN_IMAGE; API port $API_PORT"

# ---- images ----
build() { # build TAG DOCKERFILE ARGS...
  local tag=$1 file=$2 t; shift 2; t=$(date +%s)
  # podman writes OCI images by default, which drop the Dockerfiles' HEALTHCHECK
  "$ENGINE" build -q ${FORMAT_ARG:+"$FORMAT_ARG"} -f "$file" -t "$tag" "$@" . >/dev/null
  echo "built $tag in $(( $(date +%s) - t ))s: $("$ENGINE" image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')"
}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  wheel=${TORCH_WHEEL:-$(ls /opt/wheels/torch-*+cpu-cp311-*.whl 2>/dev/null | head -1 || true)}
  if [ -n "$wheel" ] && [ ! -e "deploy/wheels/$(basename "$wheel")" ]; then
    ln "$wheel" deploy/wheels/ 2>/dev/null || cp "$wheel" deploy/wheels/
  fi
  build "$API_IMAGE" deploy/Dockerfile.api --build-arg PYTHON_IMAGE="$PYTHON_IMAGE"
  build "$RAY_IMAGE" deploy/Dockerfile.ray --build-arg PYTHON_IMAGE="$PYTHON_IMAGE" --build-arg TORCH_BUILD=cpu
  build "$PG_IMAGE" deploy/test/Dockerfile.postgres --build-arg DEBIAN_IMAGE="$DEBIAN_IMAGE"
  build "$S3_IMAGE" deploy/test/Dockerfile.s3 --build-arg PYTHON_IMAGE="$PYTHON_IMAGE"
  phase "images built"
fi
"$ENGINE" run --rm "$API_IMAGE" python -c "import importlib.util as u; assert u.find_spec('torch') is None" \
  || die "the API image carries torch"
"$ENGINE" run --rm "$RAY_IMAGE" python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__" \
  || die "the Ray image lacks the CPU torch build"

# ---- bring up, in dependency order (podman < 4.6 ignores depends_on's health conditions) ----
# podman without systemd logs that it cannot schedule health checks; the waits here do them
up() { "${C[@]}" up -d --no-build --no-deps "$@" 2>&1 >/dev/null | { grep -v "systemd\|syslog" >&2 || true; }; }
healthy() { "$ENGINE" exec "$(cid "$1")" "${@:2}"; }
start_stack() {
  up postgres minio
  wait_for 120 "postgres ready" healthy postgres pg_isready -U slimtrain -d slimtrain
  # up once it has replayed what it stored before a restart (deploy/test/s3-server.py)
  wait_for 120 "S3 server up" healthy minio test -e /tmp/s3-ready
  up minio-init
  "$ENGINE" wait "$(cid minio-init)" | grep -qx 0 || die "minio-init failed: $("$ENGINE" logs "$(cid minio-init)" 2>&1 | tail -5)"
  up ray-head
  # `ray start` gives its raylet 30 s to register; on a loaded machine it can miss that and
  # exit, and the restart policy starts it again: wait for a start that got through
  wait_for 240 "ray head started" head_started
  up ray-worker-cpu
  [ "$(cids ray-worker-cpu | wc -l)" -eq 2 ] || die "expected 2 ray-worker-cpu containers, got $(cids ray-worker-cpu | wc -l)"
  up api
  wait_for 180 "API ready on port $API_PORT" curl -fsS "http://127.0.0.1:$API_PORT/readyz"
  wait_for 300 "3 Ray nodes alive" ray_nodes_alive 3
}
head_started() {
  "$ENGINE" logs "$(cid ray-head)" 2>&1 | grep -q "Ray runtime started" \
    && healthy ray-head ray health-check --address ray-head:6379
}
ray_nodes_alive() { # the API's view: GET /v1/cluster lists the alive Ray nodes
  curl -fsS -H "Authorization: Bearer $API_TOKEN" "http://127.0.0.1:$API_PORT/v1/cluster" \
    | python3 -c "import json,sys; n=[x for x in json.load(sys.stdin)['nodes'] if x['alive']]; sys.exit(len(n) < $1)"
}
start_stack
phase "stack up: api, ray-head, 2 x ray-worker-cpu, postgres, s3"

# ---- 1. a 2-worker DDP job through the published port, with the CLI ----
export SLIMTRAIN_URL="http://127.0.0.1:$API_PORT" SLIMTRAIN_TOKEN="$API_TOKEN"
JOB=$("$CLI" submit deploy/test/job-ddp.yaml --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "job $JOB submitted"
# Follows the job's server-sent events until it ends, counting the live metric events.
python3 - "$JOB" > "$work/events.json" <<'PY' || die "following the job's events failed"
import json, os, sys, urllib.request
req = urllib.request.Request(f"{os.environ['SLIMTRAIN_URL']}/v1/jobs/{sys.argv[1]}/events",
                             headers={"Authorization": f"Bearer {os.environ['SLIMTRAIN_TOKEN']}",
                                      "Accept": "text/event-stream"})
counts, states, event = {}, [], None
with urllib.request.urlopen(req, timeout=900) as r:
    for raw in r:
        line = raw.decode().rstrip("\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:") and event:
            counts[event] = counts.get(event, 0) + 1
            if event == "state":
                states.append(json.loads(line[5:])["state"])
                if states[-1] in ("succeeded", "failed", "cancelled"):
                    break
print(json.dumps({"events": counts, "states": states}))
PY
cat "$work/events.json"
STATE=$("$CLI" status "$JOB" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
[ "$STATE" = succeeded ] || { "$CLI" logs "$JOB" | tail -40; die "job $JOB ended $STATE"; }
python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["events"]; sys.exit(not e.get("metric"))' "$work/events.json" \
  || die "no live metric event arrived over SSE"
phase "job $JOB succeeded"

# ---- 2. the two ranks ran on the two worker containers' Ray nodes ----
"$ENGINE" exec -i "$(cid ray-head)" python - "$JOB" < deploy/test/ray_placement.py > "$work/placement.json"
python3 - "$work/placement.json" <<'PY' || die "rank placement: see above"
import json, sys
p = json.load(open(sys.argv[1]))
head = {n["node_id"] for n in p["nodes"] if n["head"]}
workers = {n["node_id"] for n in p["nodes"] if not n["head"] and n["state"] == "ALIVE"}
used = [w["node_id"] for w in p["workers"]]
print(f"Ray job {p['ray_job_id']}: RayTrainWorker actors on nodes {used}; worker nodes {sorted(workers)}")
assert len(used) == 2, f"expected 2 RayTrainWorker actors, found {len(used)}"
assert len(set(used)) == 2, "both ranks ran on one node"
assert set(used) == workers, "the ranks did not run on the two worker containers"
assert not set(used) & head
PY
phase "ranks on two nodes"

# ---- 2b. a local-folder artifact store is refused across nodes (workers/store_check.py) ----
"$ENGINE" exec "$(cid ray-head)" python -c '
import ray
from service.artifacts import LocalArtifactStore
from service.errors import ConfigError
from workers.store_check import check_store_shared
ray.init(address="auto", logging_level="ERROR")
try:
    check_store_shared(LocalArtifactStore("/tmp/slimtrain-local-store"))
except ConfigError as e:
    print("refused as expected:", e.message)
else:
    raise SystemExit("a head-local artifact folder was accepted with workers on other nodes")
' || die "local-folder store check"
phase "local-folder store refused with workers on other nodes"

# ---- 3. artifacts and checkpoints in the bucket, against the manifests ----
# verify_bucket JOB [NAME...]: its artifacts and checkpoints, read from the S3 server itself,
# against its manifests; the NAMEs besides the ones every job exports must be there too
verify_bucket() {
  "$ENGINE" exec -i -e AWS_ACCESS_KEY_ID=test -e AWS_SECRET_ACCESS_KEY=test -e AWS_DEFAULT_REGION=us-east-1 \
      "$(cid minio)" python - "$BUCKET" artifacts "$1" \
      spec.json metrics.jsonl report.json model.safetensors model.onnx "${@:2}" \
    < deploy/test/verify_bucket.py || die "bucket contents of $1 disagree with the manifests"
}
verify_bucket "$JOB" model.int8.onnx  # job-ddp.yaml quantizes
"$CLI" download "$JOB" "$work/download" >/dev/null || die "slimtrain download (sha256-checked) failed"
"$CLI" report "$JOB" --json > "$work/report-before.json"
phase "artifacts verified in the bucket and through the API"

# ---- 4. a worker container killed mid-job, and the API restarted mid-job ----
api() { curl -fsS -H "Authorization: Bearer $API_TOKEN" "http://127.0.0.1:$API_PORT/v1/$1"; }
state_of() { "$CLI" status "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }
has_checkpoint() {
  api "jobs/$1/artifacts" | python3 -c 'import json,sys; d=json.load(sys.stdin); items=d["items"] if isinstance(d,dict) else d
sys.exit(not any(a["name"].startswith("checkpoints/") and a["name"].endswith("/manifest.json") for a in items))'
}
JOB2=$("$CLI" submit deploy/test/job-ddp-resume.yaml --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "job $JOB2 submitted"
wait_for 600 "a first checkpoint of $JOB2" has_checkpoint "$JOB2"
[ "$(state_of "$JOB2")" = running ] || die "job $JOB2 is $(state_of "$JOB2") at its first checkpoint, not running"
victim=$(cids ray-worker-cpu | tail -1)
"$ENGINE" kill "$victim" >/dev/null
echo "killed worker container $victim mid-job"
sleep 3
# the restart policy or an operator brings the node back; the next attempt needs both
"$ENGINE" start "$victim" >/dev/null 2>&1 || true
"$ENGINE" restart "$(cid api)" >/dev/null
echo "restarted the API container mid-job"
wait_for 180 "API ready after restart" curl -fsS "http://127.0.0.1:$API_PORT/readyz"
for ((i = 0; i < 900; i += 5)); do
  st=$(state_of "$JOB2" 2>/dev/null || echo unknown)
  case $st in succeeded | failed | cancelled) break ;; esac
  sleep 5
done
[ "$st" = succeeded ] || { "$CLI" logs "$JOB2" | tail -40; die "job $JOB2 ended $st after the kill"; }
api "jobs/$JOB2/attempts" > "$work/attempts.json"
api "jobs/$JOB2/artifacts/metrics.jsonl" > "$work/metrics2.jsonl"
python3 - "$work/attempts.json" "$work/metrics2.jsonl" <<'PY' || die "resume after the kill: see above"
import json, sys
d = json.load(open(sys.argv[1]))
attempts = d["items"] if isinstance(d, dict) else d
starts = [r for r in map(json.loads, open(sys.argv[2])) if r.get("event") == "start"]
print("attempts:", [(a["number"], a["submission_id"], a["outcome"]) for a in attempts])
print("training starts (resumed_from):", [s.get("resumed_from") for s in starts])
assert len(attempts) >= 2, "the kill did not cost an attempt"
assert len({a["submission_id"] for a in attempts}) == len(attempts), "two attempts shared a Ray job"
assert attempts[-1]["outcome"] == "succeeded"
assert any((s.get("resumed_from") or 0) > 0 for s in starts), "no attempt resumed from a checkpoint"
PY
[ "$(state_of "$JOB")" = succeeded ] || die "job $JOB lost after the API restart"
phase "worker killed and API restarted mid-job: $JOB2 resumed from its checkpoint and succeeded"

# ---- 5. down / up with the same volumes ----
"${C[@]}" down -t 5 >/dev/null
start_stack
for j in "$JOB" "$JOB2"; do
  [ "$(state_of "$j")" = succeeded ] || die "job $j lost after down/up"
  "$CLI" jobs --json | python3 -c "import json,sys; ids=[j['id'] for j in json.load(sys.stdin)['items']]; sys.exit('$j' not in ids)" \
    || die "job $j not listed after down/up"
done
verify_bucket "$JOB" model.int8.onnx
verify_bucket "$JOB2"
"$CLI" report "$JOB" --json > "$work/report-after.json"
cmp -s "$work/report-before.json" "$work/report-after.json" || die "the report of $JOB changed across down/up"
rm -rf "$work/download"
"$CLI" download "$JOB" "$work/download" >/dev/null || die "slimtrain download (sha256-checked) failed after down/up"
phase "job records, artifacts, checkpoints and reports kept across down/up (PostgreSQL and S3 volumes)"
echo "PASS: deployment test"

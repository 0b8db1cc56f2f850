#!/usr/bin/env bash
# One device call (`run` with carry [".device-carry"]): `bash bench/device/run.sh 2>&1 | tee $OUT/device.log`.
# The GPU check, then the API at 1 and 2 processes on the device's cores (PostgreSQL and SQLite).
# STEPS="replicas" (or "gpu"): only those; the default runs both.
# Results land in $OUT (BENCH_OUT); bench/results/{gpu_check,api_replicas_16cores}/ hold them.
set -u
export PYTHONUNBUFFERED=1 TZ=UTC
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .device-carry/whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$PWD
echo "== $(($(date +%s) - t0)) s: wheels in"
nproc; lscpu | grep -E "Model name|^CPU\(s\)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
STEPS=${STEPS:-gpu replicas}
if [[ " $STEPS " == *" gpu "* ]]; then
  echo "== $(($(date +%s) - t0)) s: gpu_check"
  BENCH_OUT=$OUT timeout 220 python3 -m bench.gpu_check --require-gpu; echo "gpu_check rc=$?"
fi
if [[ " $STEPS " == *" replicas "* ]]; then
  echo "== $(($(date +%s) - t0)) s: postgres"
  bash bench/device/pg_setup.sh; echo "pg_setup rc=$?"
  echo "== $(($(date +%s) - t0)) s: replicas"
  BENCH_OUT=$OUT timeout ${REPLICAS_TIMEOUT:-330} python3 -m bench.api.replicas --seconds 5 --rounds 3 --generators 2 ${REPLICAS_ARGS:-}
  echo "replicas rc=$?"
fi
echo "== $(($(date +%s) - t0)) s: done"

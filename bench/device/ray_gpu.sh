#!/usr/bin/env bash
# Jobs through Ray on the device's GPU, as `slimtrain run` runs them (an embedded Ray head with
# token auth, Ray Train workers, export, report): `run` with carry [".device-carry/ray",
# ".device-carry/core"], command `bash bench/device/ray_gpu.sh 2>&1 | tee $OUT/ray_gpu.log`.
# A call carries at most 64 MiB: bench/device/prepare.sh --ray puts there Ray's wheel trimmed
# (no Java jar, RLlib, Ray LLM or JS source maps: 42 of 79 MB) with the wheels Ray and the driver
# need that the device lacks (ray/), and the service's few (core/). Reports land in $OUT/ray_gpu/.
set -u
export PYTHONUNBUFFERED=1 HOME=/tmp/rayhome
mkdir -p $HOME $OUT/ray_gpu /tmp/jobs
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .device-carry/ray/*.whl .device-carry/core/*.whl || exit 9
export PYTHONPATH=/tmp/site:$PWD
python3 - <<'PY'
import json, yaml
jobs = {
    # one worker on the whole GPU: DDP over NCCL, GMP to 90% + int8 QAT
    "digits-gmp90-int8-gpu": ("digits-gmp90-int8.yaml", {"strategy": "ddp", "workers": 1, "gpus_per_worker": 1}),
    # two workers sharing the one GPU (half each): FSDP, bf16
    "text-gpt-fsdp-2x-half-gpu": ("text-gpt.yaml", {"strategy": "fsdp", "workers": 2, "gpus_per_worker": 0.5}),
}
for name, (example, parallel) in jobs.items():
    raw = yaml.safe_load(open(f"examples/{example}"))
    raw["name"], raw["parallel"] = name, {**raw.get("parallel", {}), **parallel}
    json.dump(raw, open(f"/tmp/jobs/{name}.json", "w"))
PY
for j in digits-gmp90-int8-gpu text-gpt-fsdp-2x-half-gpu; do
  t0=$(date +%s)
  timeout 200 python3 -m api.cli run /tmp/jobs/$j.json --out /tmp/jobs/$j --json > $OUT/ray_gpu/$j.report.json 2> $OUT/ray_gpu/$j.log
  echo "$j: rc=$? in $(($(date +%s) - t0)) s"; tail -5 $OUT/ray_gpu/$j.log
done

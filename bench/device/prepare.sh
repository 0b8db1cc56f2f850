#!/usr/bin/env bash
# Prepare what a device call carries (run here, from the repo root): the Python packages the
# benches need that the device image lacks, as CPython 3.12 wheels at this repo's locked versions,
# and Debian bookworm's PostgreSQL 15 (server, initdb, pg_ctl, psql and the libraries they link),
# for machines that can reach no package registry. Everything lands in .device-carry/ (git-ignored),
# which the call names in `carry`; then run bench/device/run.sh there.
#
# `--ray`: instead, what bench/device/ray_gpu.sh carries: Ray's wheel trimmed to fit a call (its
# Java jar, RLlib, Ray LLM and JS source maps removed: 42 of 79 MB) with the wheels Ray and the
# driver need that the device lacks (.device-carry/ray/), and the service's few (.device-carry/core/).
set -euo pipefail
C=.device-carry
dl() {  # CPython 3.12 wheels of the given requirements into folder $1
  local to=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$to" "$@"
}
locked() { for p in "$@"; do grep -i -m1 "^$p==" requirements.lock | cut -d' ' -f1; done; }
if [ "${1:-}" = --ray ]; then
  mkdir -p $C/ray $C/core
  dl $C/core $(locked pydantic pydantic-core annotated-types typing-inspection pydantic-settings \
    python-dotenv zstandard typing-extensions)
  dl $C/ray $(locked jsonschema jsonschema-specifications referencing rpds-py colorful tensorboardx \
    jsonpointer rfc3339-validator)
  T=$(mktemp -d)
  dl $T $(locked ray)
  (cd $T && mkdir x && cd x && unzip -q ../ray-*.whl && rm -rf ray/jars ray/rllib ray/llm &&
    find . -name '*.js.map' -delete && rm ../ray-*.whl &&
    python3 -c "
import os, zipfile
with zipfile.ZipFile('../trimmed.whl', 'w', zipfile.ZIP_DEFLATED, compresslevel=9) as z:
    for root, _, files in os.walk('.'):
        for f in files:
            z.write(os.path.join(root, f), os.path.relpath(os.path.join(root, f), '.'))
")
  mv $T/trimmed.whl $C/ray/$(cd $T && ls -d x/ray-*.dist-info | sed 's|x/||; s|.dist-info||')-cp312-cp312-manylinux2014_x86_64.whl
  rm -rf $T
  du -sh $C/ray $C/core
  exit 0
fi
mkdir -p $C/whl
dl $C/whl $(locked pydantic pydantic-core annotated-types typing-inspection zstandard fastapi starlette \
  sse-starlette sqlalchemy greenlet alembic mako optuna colorlog pydantic-settings python-dotenv uvicorn \
  httptools psycopg psycopg-binary psycopg-pool typing-extensions opentelemetry-api torch-pruning)
# PostgreSQL: the four programs the tests' server fixture runs, the server's own modules (no LLVM
# JIT: 100+ MB), and every shared library they link except glibc's; pg_setup.sh installs only
# those the device lacks.
B=$(mktemp -d)
mkdir -p $B/root/usr/lib/postgresql $B/root/usr/share/postgresql $B/lib $B/zoneinfo/Etc
cp -a /usr/lib/postgresql/15 $B/root/usr/lib/postgresql/
cp -a /usr/share/postgresql/15 $B/root/usr/share/postgresql/
rm -rf $B/root/usr/lib/postgresql/15/lib/llvmjit* $B/root/usr/lib/postgresql/15/lib/bitcode
find $B/root/usr/lib/postgresql/15/bin -type f ! -name initdb ! -name pg_ctl ! -name postgres ! -name psql -delete
for b in $B/root/usr/lib/postgresql/15/bin/* $B/root/usr/lib/postgresql/15/lib/*.so; do
  ldd "$b" | awk '$3 ~ /^\// {print $3}'
done | sort -u | grep -v -E '/(libc|libm|libpthread|libdl|librt|ld-linux-x86-64|libstdc\+\+|libgcc_s)\.so' |
  xargs -I{} cp -L {} $B/lib/
cp -L /usr/share/zoneinfo/UTC $B/zoneinfo/ && cp -L /usr/share/zoneinfo/Etc/UTC $B/zoneinfo/Etc/
tar -C $B -cJf $C/pg15.tar.xz root lib zoneinfo
rm -rf $B
du -sh $C/*

#!/usr/bin/env bash
# Prepare what a device call carries (run here, from the repo root): the Python packages the
# benches need that the device image lacks, as CPython 3.12 wheels at this repo's locked versions,
# and Debian bookworm's PostgreSQL 15 (server, initdb, pg_ctl, psql and the libraries they link),
# for machines that can reach no package registry. Everything lands in .device-carry/ (git-ignored),
# which the call names in `carry`; then run bench/device/run.sh there.
set -euo pipefail
C=.device-carry
mkdir -p $C/whl
pins=$(for p in pydantic pydantic-core annotated-types typing-inspection zstandard fastapi starlette \
  sse-starlette sqlalchemy greenlet alembic mako optuna colorlog pydantic-settings python-dotenv uvicorn \
  httptools psycopg psycopg-binary psycopg-pool typing-extensions opentelemetry-api torch-pruning; do
  grep -i -m1 "^$p==" requirements.lock | cut -d' ' -f1; done)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d $C/whl $pins
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

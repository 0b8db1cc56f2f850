#!/usr/bin/env bash
# Install the carried PostgreSQL 15 (Debian bookworm's binaries) where tests/plugins/postgres.py
# looks, with only the shared libraries this system lacks added to the loader's path.
set -u
B=/tmp/pgb; mkdir -p $B && python3 -c "import tarfile as t; kw = {'filter': 'fully_trusted'} if hasattr(t, 'fully_trusted_filter') else {}; t.open('.device-carry/pg15.tar.xz').extractall('/tmp/pgb', **kw)" || exit 11
mkdir -p /usr/lib/postgresql /usr/share/postgresql
cp -a $B/root/usr/lib/postgresql/15 /usr/lib/postgresql/ && cp -a $B/root/usr/share/postgresql/15 /usr/share/postgresql/ || exit 12
mkdir -p /opt/pgextra
have=$(ldconfig -p | awk 'NR>1 {print $1}')
for f in $B/lib/*; do n=$(basename $f); echo "$have" | grep -qxF "$n" || cp $f /opt/pgextra/; done
echo /opt/pgextra > /etc/ld.so.conf.d/zz-pgextra.conf && ldconfig
echo "pg: libs added: $(ls /opt/pgextra | tr '\n' ' ')"
[ -e /usr/share/zoneinfo/UTC ] || { mkdir -p /usr/share/zoneinfo/Etc; cp $B/zoneinfo/UTC /usr/share/zoneinfo/; cp $B/zoneinfo/Etc/UTC /usr/share/zoneinfo/Etc/; }
id postgres >/dev/null 2>&1 || useradd -r -M -s /bin/sh postgres || exit 13
for b in postgres psql initdb; do ldd /usr/lib/postgresql/15/bin/$b | grep "not found" && echo "pg: $b lacks a library"; done
command -v runuser >/dev/null || echo "pg: no runuser"
/usr/lib/postgresql/15/bin/postgres -V

#!/bin/sh
# The official postgres image's first start, in short: create the cluster with the user and
# password from the environment, the database, listen on the network; then run the server as
# `postgres` in the foreground. A data folder that holds a cluster already is used as it is.
set -eu
: "${POSTGRES_USER:?}" "${POSTGRES_DB:?}" "${POSTGRES_PASSWORD_FILE:?}"
install -d -o postgres -g postgres -m 700 "$PGDATA"
install -d -o postgres -g postgres /var/run/postgresql
as_pg() { runuser -u postgres -- env PATH="$PATH" "$@"; }
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  install -o postgres -m 600 "$POSTGRES_PASSWORD_FILE" /tmp/pwfile
  # UTF8 as the official image: psycopg reads an SQL_ASCII server's answers as bytes
  as_pg initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile=/tmp/pwfile --encoding=UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f /tmp/pwfile
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  as_pg pg_ctl -D "$PGDATA" -w -o "-c listen_addresses=''" start >/dev/null
  as_pg psql -q -U "$POSTGRES_USER" -d postgres -c "CREATE DATABASE \"$POSTGRES_DB\""
  as_pg pg_ctl -D "$PGDATA" -w stop >/dev/null
fi
# setpriv execs (runuser would stay the parent and swallow `stop`'s SIGTERM)
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA"

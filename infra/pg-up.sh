#!/usr/bin/env bash
# Starts a project-local PostgreSQL on 127.0.0.1:$CRM_PG_PORT unless one answers
# there already. Idempotent. As root, runs the server as the `postgres` user
# (PostgreSQL refuses to run as root) and installs the package if missing.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(pg_bin)" ]; then apt_install postgresql; fi
BIN="$(pg_bin)"
[ -x "$BIN/pg_ctl" ] || die "PostgreSQL binaries not found under /usr/lib/postgresql"

if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$CRM_PG_PORT"; then
  log "postgres: already answering on 127.0.0.1:$CRM_PG_PORT"
  exit 0
fi

DATA="$CRM_DATA_DIR/pg"
as_owner() { "$@"; }
if is_root; then
  id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  # The server runs as `postgres`, which must be able to reach its data dir.
  mkdir -p "$CRM_DATA_DIR"
  if ! runuser -u postgres -- test -x "$CRM_DATA_DIR"; then
    DATA="/var/lib/postgresql/crm-$(printf '%s' "$ROOT" | md5sum | cut -c1-8)/pg"
    log "postgres: $CRM_DATA_DIR is not reachable by user postgres; using $DATA"
  fi
  mkdir -p "$DATA"
  chown -R postgres: "$DATA"
  chmod 700 "$DATA"
  as_owner() { runuser -u postgres -- "$@"; }
fi

if [ ! -f "$DATA/PG_VERSION" ]; then
  log "postgres: initializing $DATA"
  as_owner "$BIN/initdb" -D "$DATA" -U crm --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
fi

log "postgres: starting on 127.0.0.1:$CRM_PG_PORT (data $DATA)"
as_owner "$BIN/pg_ctl" -D "$DATA" -l "$DATA/server.log" -w -t 60 start -o "\
 -c listen_addresses=127.0.0.1 -c port=$CRM_PG_PORT -c unix_socket_directories='$DATA'\
 -c max_connections=400 -c shared_buffers=512MB -c max_wal_size=4GB\
 -c log_min_messages=warning -c shared_preload_libraries=pg_stat_statements" >/dev/null || { tail -n 20 "$DATA/server.log" >&2; die "postgres did not start"; }

if ! "$BIN/psql" -h 127.0.0.1 -p "$CRM_PG_PORT" -U crm -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'crm'" | grep -q 1; then
  "$BIN/createdb" -h 127.0.0.1 -p "$CRM_PG_PORT" -U crm crm
fi
log "postgres: ready at postgres://crm@127.0.0.1:$CRM_PG_PORT/crm"

#!/usr/bin/env bash
# Stops the project-local PostgreSQL started by pg-up.sh (never a foreign one).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
for DATA in "$CRM_DATA_DIR/pg" /var/lib/postgresql/crm-"$(printf '%s' "$ROOT" | md5sum | cut -c1-8)"/pg; do
  if [ -f "$DATA/postmaster.pid" ]; then
    log "postgres: stopping ($DATA)"
    if is_root; then runuser -u postgres -- "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null
    else "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null; fi
  fi
done

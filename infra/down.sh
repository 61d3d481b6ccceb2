#!/usr/bin/env bash
# Stops everything `just up` started: the crm process, NATS, PostgreSQL.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PID_FILE="$CRM_DATA_DIR/crm.pid"
if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  log "crm: stopping (SIGTERM, graceful)"
  kill -TERM "$(cat "$PID_FILE")"
  for _ in $(seq 100); do kill -0 "$(cat "$PID_FILE")" 2>/dev/null || break; sleep 0.1; done
fi
rm -f "$PID_FILE"
bash "$(dirname "$0")/nats-down.sh"
bash "$(dirname "$0")/pg-down.sh"

#!/usr/bin/env bash
# Stops the project-local nats-server started by nats-up.sh.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
PID_FILE="$CRM_DATA_DIR/nats/nats.pid"
if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  log "nats: stopping"
  kill "$(cat "$PID_FILE")"
  for _ in $(seq 50); do kill -0 "$(cat "$PID_FILE")" 2>/dev/null || break; sleep 0.1; done
fi
rm -f "$PID_FILE"

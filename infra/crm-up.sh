#!/usr/bin/env bash
# Runs `crm all` in the background (pid and log under the data dir) and waits
# until its gRPC health check answers SERVING. Idempotent.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
BIN="${CRM_BIN:-$ROOT/target/release/crm}"
PID_FILE="$CRM_DATA_DIR/crm.pid"
LOG="$CRM_DATA_DIR/crm.log"
mkdir -p "$CRM_DATA_DIR"
if [ -f "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
  log "crm: already running (pid $(cat "$PID_FILE"))"
  exit 0
fi
[ -x "$BIN" ] || die "$BIN not built: run 'cargo build --release -p crm'"
log "crm: starting 'crm all' (log $LOG)"
setsid nohup "$BIN" all >>"$LOG" 2>&1 < /dev/null &
echo $! > "$PID_FILE"
healthy() {
  kill -0 "$(cat "$PID_FILE")" 2>/dev/null || { tail -n 30 "$LOG" >&2; die "crm exited during startup"; }
  "$BIN" health >/dev/null 2>&1
}
wait_for 60 "crm all" healthy
log "crm: serving gRPC on ${CRM__GRPC__ADDR:-127.0.0.1:50051} (health and reflection); stop with 'just down'"

#!/usr/bin/env bash
# Starts a project-local nats-server with JetStream (file storage) on
# 127.0.0.1:$CRM_NATS_PORT unless something answers there already. Idempotent.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if port_open "$CRM_NATS_PORT"; then
  log "nats: already answering on 127.0.0.1:$CRM_NATS_PORT"
  exit 0
fi
command -v nats-server >/dev/null || apt_install nats-server
DATA="$CRM_DATA_DIR/nats"
mkdir -p "$DATA"
log "nats: starting JetStream on 127.0.0.1:$CRM_NATS_PORT (store $DATA)"
setsid nohup nats-server --jetstream --store_dir "$DATA" \
  --addr 127.0.0.1 --port "$CRM_NATS_PORT" --http_port "$CRM_NATS_MONITOR_PORT" \
  --pid "$DATA/nats.pid" --log "$DATA/nats.log" >/dev/null 2>&1 < /dev/null &
wait_for 20 "nats-server" port_open "$CRM_NATS_PORT"
log "nats: ready at nats://127.0.0.1:$CRM_NATS_PORT"

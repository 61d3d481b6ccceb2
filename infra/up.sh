#!/usr/bin/env bash
# Brings up the infrastructure the CRM needs: PostgreSQL and NATS JetStream.
set -euo pipefail
dir="$(dirname "$0")"
bash "$dir/pg-up.sh"
bash "$dir/nats-up.sh"

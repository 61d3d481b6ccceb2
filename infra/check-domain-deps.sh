#!/usr/bin/env bash
# The domain crate stays pure: no async runtime, no I/O, no internal crates.
set -euo pipefail
deps="$(cargo tree -p crm-domain -e normal --prefix none | awk '{print $1}' | sort -u)"
bad="$(printf '%s\n' "$deps" | grep -E '^(tokio|async-|futures|tokio-postgres|postgres|deadpool|tonic|hyper|async-nats|reqwest|crm-)' | grep -v '^crm-domain$' || true)"
if [ -n "$bad" ]; then
  echo "crm-domain must not depend on:" >&2
  printf '  %s\n' $bad >&2
  exit 1
fi
echo "crm-domain dependencies are pure: $(printf '%s ' $deps)"

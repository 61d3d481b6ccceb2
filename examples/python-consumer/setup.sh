#!/usr/bin/env bash
# Prepares a virtualenv with the example consumer's two dependencies
# (nats-py and the CloudEvents SDK) under target/python-consumer. Idempotent;
# prints the interpreter's path. Installs python3-venv when running as root.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="$root/target/python-consumer"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import nats, cloudevents' 2>/dev/null; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv >/dev/null
    else
      echo "python3 with venv is missing: sudo apt-get install python3 python3-venv" >&2
      exit 1
    fi
  fi
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/examples/python-consumer/requirements.txt" >&2
fi
echo "$venv/bin/python"

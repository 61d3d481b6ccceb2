# Shared settings for the infra scripts. Sourced, not run.
# Every value can be overridden from the environment.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRM_DATA_DIR="${CRM_DATA_DIR:-$ROOT/.data}"
CRM_PG_PORT="${CRM_PG_PORT:-55432}"
CRM_NATS_PORT="${CRM_NATS_PORT:-4222}"
CRM_NATS_MONITOR_PORT="${CRM_NATS_MONITOR_PORT:-8222}"
CRM_GRPC_PORT="${CRM_GRPC_PORT:-50051}"

log() { printf '[infra] %s\n' "$*" >&2; }
die() { printf '[infra] error: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

# Is something listening on 127.0.0.1:$1?
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# apt_install PKG...: installs as root, or says exactly what to run.
apt_install() {
  if is_root; then
    log "installing $* (apt-get)"
    if [ -z "${CRM_APT_UPDATED:-}" ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      export CRM_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  else
    die "missing $*: install with: sudo apt-get install -y $*"
  fi
}

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local seconds="$1" what="$2"; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || die "$what did not come up within ${seconds}s"
    sleep 0.2
  done
}

#!/usr/bin/env bash
# One idempotent bring-up for the README commands and CI.
#
#   scripts/bootstrap.sh            set up only
#   scripts/bootstrap.sh demo       set up, then run `fleet demo`
#   scripts/bootstrap.sh test       set up, then run ruff, mypy and the test suite
#
# On Debian as root it installs what is missing (docker.io, redis-server,
# debootstrap, python3-venv) and starts dockerd when no engine answers. Where
# an engine already answers (a laptop with Docker running) it touches nothing
# of the system: it only makes .venv and the agent image.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="$here/.venv"
log_dir="$here/.fleet/log"
mkdir -p "$log_dir"

say() { printf '[bootstrap] %s\n' "$*"; }
die() { printf '[bootstrap] error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }
is_debian() { [ -f /etc/debian_version ] && command -v apt-get >/dev/null; }
engine_answers() { docker info >/dev/null 2>&1; }

install_missing_packages() {
  local missing=()
  engine_answers || command -v dockerd >/dev/null || missing+=(docker.io)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v ip >/dev/null || missing+=(iproute2)  # the simulated hosts of tests/hosts
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
  if [ "${1:-}" = test ]; then  # the browser tests of fleet web
    command -v chromium >/dev/null || missing+=(chromium fonts-liberation)
    command -v chromedriver >/dev/null || missing+=(chromium-driver)
    command -v promtool >/dev/null || missing+=(prometheus)  # checks docs/monitoring/
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  if is_root && is_debian; then
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log_dir/apt.log" 2>&1 \
      || die "apt-get install ${missing[*]} failed; see $log_dir/apt.log"
    # The package may start redis-server as a service; fleet starts its own.
  else
    say "warning: missing ${missing[*]}; install them (fleet needs a Docker engine, redis-server, python3-venv; its tests chromium, chromedriver and promtool)"
  fi
}

# dockerd refuses to start while /var/run/docker.pid names a process, and a
# killed daemon leaves it behind; remove it only when that process is gone.
clear_stale_pid_file() {
  local f="$1"
  [ -f "$f" ] || return 0
  local pid; pid="$(cat "$f" 2>/dev/null || true)"
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    say "removing stale $f"
    rm -f "$f"
  fi
}

start_engine() {
  engine_answers && return 0
  is_root || die "no Docker engine answers; start Docker (as root this script starts dockerd)"
  command -v dockerd >/dev/null || die "no Docker engine answers and dockerd is not installed"
  clear_stale_pid_file /var/run/docker.pid
  clear_stale_pid_file /var/run/docker/containerd/containerd.pid
  say "starting dockerd (log: $log_dir/dockerd.log)"
  nohup dockerd >"$log_dir/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 1 120); do
    engine_answers && { say "engine is up"; return 0; }
    sleep 0.5
  done
  tail -n 20 "$log_dir/dockerd.log" >&2 || true
  die "dockerd did not answer within 60 s; see $log_dir/dockerd.log"
}

make_venv() {
  local stamp="$venv/.fleet-installed" want
  want="$(sha256sum pyproject.toml | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  [ -x "$venv/bin/python" ] || { say "creating .venv"; python3 -m venv "$venv"; }
  say "installing fleet and its dev tools into .venv"
  # The distribution was called `fleet` before 0.3 (now `agent-fleet`): drop the old one.
  "$venv/bin/pip" uninstall -y -q fleet >/dev/null 2>&1 || true
  "$venv/bin/pip" install -q -e ".[dev]" >"$log_dir/pip.log" 2>&1 \
    || { tail -n 20 "$log_dir/pip.log" >&2; die "pip install failed; see $log_dir/pip.log"; }
  echo "$want" >"$stamp"
}

install_missing_packages "${1:-}"
start_engine
make_venv
"$venv/bin/fleet" image build

case "${1:-}" in
  "") ;;
  demo) shift; exec "$venv/bin/fleet" demo "$@" ;;
  test)
    shift
    "$venv/bin/ruff" check fleet tests benchmarks
    "$venv/bin/mypy" fleet
    # Two processes, a test file each at a time: most of the suite waits on
    # containers and Redis, not on the CPU (FLEET_TEST_PROCESSES=0: one process).
    exec "$venv/bin/pytest" -n "${FLEET_TEST_PROCESSES:-2}" --dist loadfile "$@" ;;
  *) die "usage: scripts/bootstrap.sh [demo|test] [args...]" ;;
esac

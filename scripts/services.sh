#!/usr/bin/env bash
# PostgreSQL and Redis on loopback for the tests and benchmarks: installed from Debian's
# packages when missing, configured for local trust auth with a database `test`, and started.
# Idempotent: a server that already answers is left alone. Tests that need them fail (never
# skip) when they are down, so this exits non-zero when either does not come up.
set -euo pipefail

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
need_pkg() {  # need_pkg COMMAND PACKAGE...
  command -v "$1" >/dev/null 2>&1 && return 0
  shift
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }

ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_isready -q -h 127.0.0.1 -p 5432; then
    ensure_test_db; return 0
  fi
  if [ -z "$(pg_bin)" ]; then
    if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
  fi
  local version; version="$(basename "$(dirname "$(pg_bin)")")"
  if [ ! -d "/etc/postgresql/$version/main" ]; then
    as_root pg_createcluster "$version" main >/dev/null
  fi
  local hba="/etc/postgresql/$version/main/pg_hba.conf"
  # Trust for local connections only: a throwaway test server bound to loopback.
  if ! grep -q "chatter-otel: trust" "$hba"; then
    as_root sh -c "cat > '$hba'" <<HBA
# chatter-otel: trust for local connections (test server on loopback only)
local   all   all                 trust
host    all   all   127.0.0.1/32  trust
host    all   all   ::1/128       trust
HBA
  fi
  as_root sed -i "s/^#\?listen_addresses.*/listen_addresses = '127.0.0.1'/" \
    "/etc/postgresql/$version/main/postgresql.conf"
  echo "services: starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main restart || true
  for _ in $(seq 1 30); do
    if pg_isready -q -h 127.0.0.1 -p 5432; then ensure_test_db; return 0; fi
    sleep 1
  done
  echo "services: PostgreSQL did not come up on 127.0.0.1:5432" >&2; return 1
}

ensure_test_db() {
  local exists
  exists="$(psql -h 127.0.0.1 -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'test'" 2>/dev/null || true)"
  if [ "$exists" != 1 ]; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE test" >/dev/null || {
      echo "services: cannot create database test (is local trust auth on?)" >&2; return 1; }
  fi
}

ensure_redis() {
  if command -v redis-cli >/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    return 0
  fi
  need_pkg redis-server redis-server
  echo "services: starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/chatter-otel.log || true
  for _ in $(seq 1 30); do
    redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "services: Redis did not come up on 127.0.0.1:6379" >&2; return 1
}

ensure_postgres
ensure_redis

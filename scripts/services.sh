#!/usr/bin/env bash
# PostgreSQL and Redis for the tests and benchmarks, private to this checkout (and Debian's
# Chromium, for the tests that open a page in a real browser):
#   - their own data directories under .services/ (removed by `make clean`), never a system
#     cluster, never a file under /etc;
#   - their own loopback ports: CHATTER_OTEL_PG_PORT (default 55432) and
#     CHATTER_OTEL_REDIS_PORT (default 56379);
#   - installed from Debian's packages only when the binaries are missing.
#
#   scripts/services.sh start     start both (idempotent: a server that answers is left alone)
#   scripts/services.sh stop      stop both (what `start` started; the data stays)
#   scripts/services.sh run CMD   start, run CMD, stop again whatever CMD did (make test)
#
# PostgreSQL: local trust auth on loopback only, superuser `postgres`, a database `test`.
# Tests that need these fail (never skip) when they are down, so `start` exits non-zero when
# either does not come up.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)/.services"
pg_port="${CHATTER_OTEL_PG_PORT:-55432}"
redis_port="${CHATTER_OTEL_REDIS_PORT:-56379}"
pg_data="$root/pg"
redis_dir="$root/redis"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" \
    >/dev/null
}

# The browser the page tests drive (Playwright, with Debian's build, never a downloaded one).
ensure_browser() { command -v chromium >/dev/null || apt_install chromium fonts-dejavu-core; }

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1; }

# Debian's initdb refuses to run as root: the cluster belongs to the `postgres` user the
# package creates (a non-root developer runs it as themselves).
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_ready() { "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$pg_port" 2>/dev/null; }

start_postgres() {
  [ -n "$(pg_bin)" ] || apt_install postgresql
  local bin; bin="$(pg_bin)"
  if ! pg_ready; then
    mkdir -p "$root"
    if [ ! -f "$pg_data/PG_VERSION" ]; then
      rm -rf "$pg_data" && mkdir -p "$pg_data"
      [ "$(id -u)" = 0 ] && chown postgres: "$pg_data"
      as_pg "$bin/initdb" -D "$pg_data" -U postgres -A trust -E UTF8 >"$root/pg-initdb.log" \
        || { cat "$root/pg-initdb.log" >&2; return 1; }
    fi
    echo "services: starting PostgreSQL on 127.0.0.1:$pg_port ($pg_data)"
    # The socket goes into the data directory: nothing under /var/run is needed or touched.
    as_pg "$bin/pg_ctl" -D "$pg_data" -l "$pg_data/server.log" -w -t 30 \
      -o "-p $pg_port -c listen_addresses=127.0.0.1 -k $pg_data -c fsync=off" start >/dev/null \
      || { tail -n 20 "$pg_data/server.log" >&2; return 1; }
  fi
  local exists
  exists="$("$bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'test'")"
  if [ "$exists" != 1 ]; then
    "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -qc "CREATE DATABASE test"
  fi
}

redis_ready() { redis-cli -h 127.0.0.1 -p "$redis_port" ping >/dev/null 2>&1; }

start_redis() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
    || apt_install redis-server redis-tools
  redis_ready && return 0
  mkdir -p "$redis_dir"
  echo "services: starting Redis on 127.0.0.1:$redis_port ($redis_dir)"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" --save "" \
    --appendonly no --dir "$redis_dir" --pidfile "$redis_dir/redis.pid" \
    --logfile "$redis_dir/redis.log"
  for _ in $(seq 1 50); do redis_ready && return 0; sleep 0.2; done
  echo "services: Redis did not come up on 127.0.0.1:$redis_port" >&2
  tail -n 20 "$redis_dir/redis.log" >&2 || true
  return 1
}

stop_all() {
  local bin; bin="$(pg_bin)"
  if [ -n "$bin" ] && [ -f "$pg_data/postmaster.pid" ]; then
    as_pg "$bin/pg_ctl" -D "$pg_data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  if [ -f "$redis_dir/redis.pid" ]; then
    redis-cli -h 127.0.0.1 -p "$redis_port" shutdown nosave >/dev/null 2>&1 \
      || kill "$(cat "$redis_dir/redis.pid")" 2>/dev/null || true
    rm -f "$redis_dir/redis.pid"
  fi
}

case "${1:-start}" in
  start) start_postgres; start_redis; ensure_browser ;;
  stop) stop_all ;;
  run)
    shift
    trap stop_all EXIT
    start_postgres
    start_redis
    ensure_browser
    CHATTER_OTEL_PG_PORT="$pg_port" CHATTER_OTEL_REDIS_PORT="$redis_port" "$@"
    ;;
  *) echo "usage: scripts/services.sh [start|stop|run CMD...]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Starts what the test suite talks to for real, on loopback: a PostgreSQL server and a local Ray cluster.
# Source it (`. scripts/test-services.sh`) from the project's virtual environment: it exports
#   TUNEBENCH_TEST_POSTGRES  a URL whose role may CREATE DATABASE (each store test gets a fresh database)
#   TUNEBENCH_TEST_RAY       the address of the Ray head (tests join it; `ray stop` ends it)
# Debian's postgresql is installed when missing (needs root, like the chromium install of the test command).
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PG_DATA=${TUNEBENCH_PG_DATA:-/tmp/tunebench-pg}
PG_PORT=${TUNEBENCH_PG_PORT:-55432}
if ! "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
  if [ "$(id -u)" = 0 ]; then AS_PG="runuser -u postgres --"; else AS_PG=""; fi
  if [ ! -s "$PG_DATA/PG_VERSION" ]; then
    rm -rf "$PG_DATA" && mkdir -p "$PG_DATA"
    if [ -n "$AS_PG" ]; then chown postgres "$PG_DATA"; fi
    $AS_PG "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust >/dev/null
  fi
  $AS_PG "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w \
    -o "-h 127.0.0.1 -p $PG_PORT -k /tmp -c max_connections=200 -c fsync=off" start >/dev/null
fi
psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qtA -c \
  "DO \$\$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='tunebench') THEN
     CREATE ROLE tunebench LOGIN CREATEDB PASSWORD 'tunebench'; END IF; END\$\$;" >/dev/null
export TUNEBENCH_TEST_POSTGRES="postgresql://tunebench:tunebench@127.0.0.1:$PG_PORT/postgres"

RAY_PORT=${TUNEBENCH_RAY_PORT:-6390}
# The test cluster and the tests' drivers agree on no token auth: Ray turns token auth on for a cluster started
# where ~/.ray/auth_token exists (any earlier local `ray.init` writes one), and its drivers then cannot connect.
export RAY_AUTH_MODE=disabled
if ! ray status --address "127.0.0.1:$RAY_PORT" >/dev/null 2>&1; then
  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 ray start --head --port "$RAY_PORT" \
    --num-cpus 2 --include-dashboard=false --object-store-memory 500000000 --disable-usage-stats >/dev/null
fi
export TUNEBENCH_TEST_RAY="127.0.0.1:$RAY_PORT"

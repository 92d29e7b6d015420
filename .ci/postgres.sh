# Source me: starts a temporary PostgreSQL server (Debian package `postgresql`) for the worker
# tests and exports NASOPT_TEST_POSTGRES. Works as root in a container without systemd: the
# cluster lives in a temp dir owned by the `postgres` user and is started with pg_ctl.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq postgresql
fi
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
PG_DIR=$(mktemp -d /tmp/nasopt-pg.XXXXXX)
PG_PORT=${NASOPT_PG_PORT:-55432}
echo nasopt-test-pw >"$PG_DIR/pw"
if [ "$(id -u)" = 0 ]; then
  chown -R postgres "$PG_DIR"
  PG_AS=(runuser -u postgres --)
else
  PG_AS=()
fi
"${PG_AS[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U nasopt --auth=md5 \
  --pwfile="$PG_DIR/pw" >"$PG_DIR/initdb.log" 2>&1 \
  || { cat "$PG_DIR/initdb.log"; return 1 2>/dev/null || exit 1; }
"${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
  -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
PGPASSWORD=nasopt-test-pw "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U nasopt nasopt_test
export NASOPT_TEST_POSTGRES="postgresql+psycopg://nasopt:nasopt-test-pw@127.0.0.1:$PG_PORT/nasopt_test"
export NASOPT_REQUIRE_POSTGRES=1
# stopped when the CI shell exits
trap '"${PG_AS[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true' EXIT

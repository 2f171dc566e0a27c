#!/usr/bin/env bash
# Install (if needed) and start Debian's PostgreSQL on loopback with a throw-away test
# database; exit non-zero if that is not possible (the PostgreSQL test then skips).
set -uo pipefail
if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql) >/dev/null 2>&1 || exit 1
fi
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
pg_lsclusters -h 2>/dev/null | grep -q "^$version main" || pg_createcluster "$version" main >/dev/null || exit 1
pg_ctlcluster "$version" main start 2>/dev/null || pg_lsclusters -h | grep -q "^$version main .* online" || exit 1
as_postgres() { su postgres -c "$1" >/dev/null 2>&1; }
as_postgres "psql -tc \"SELECT 1 FROM pg_roles WHERE rolname='leukoscope'\" | grep -q 1" \
    || as_postgres "psql -c \"CREATE USER leukoscope PASSWORD 'leukoscope'\"" || exit 1
as_postgres "dropdb --if-exists leukoscope_test" && as_postgres "createdb -O leukoscope leukoscope_test" || exit 1
echo "PostgreSQL $version on 127.0.0.1: database leukoscope_test"

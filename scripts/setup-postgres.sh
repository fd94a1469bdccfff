#!/usr/bin/env bash
# Debian's PostgreSQL server binaries for tests/test_postgres.py and tests/test_nodes.py, which start
# their own server (initdb + pg_ctl in a temporary directory). Idempotent. No cluster of the system
# is created or started: the tests need only the binaries under /usr/lib/postgresql/*/bin.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "note: PostgreSQL is missing (apt-get install postgresql); the PostgreSQL tests will skip" >&2
  exit 0
fi
# postgresql-common would create and start a 'main' cluster on install: the tests make their own
mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/swapserve-tests.conf
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null

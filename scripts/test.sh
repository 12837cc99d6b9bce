#!/usr/bin/env bash
# The whole test suite: set-up, lint, types, then pytest on SQLite and again on PostgreSQL + Redis.
# PostgreSQL (127.0.0.1:5432, trust) and Redis (127.0.0.1:6379) are used when reachable; with CI=true
# they are required and their absence fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== ruff" >&2
.venv/bin/ruff check src tests benchmarks
echo "== mypy" >&2
.venv/bin/mypy src/sendit

# pytest-xdist: 2 processes by default (most tests wait on Orthanc, subprocesses and sockets; 3
# made a listener test stall under load); SENDIT_TEST_PROCESSES=0 runs the suite in this one process
PROCESSES=${SENDIT_TEST_PROCESSES:-2}

echo "== pytest on SQLite + SqliteHuey" >&2
.venv/bin/python -m pytest -q -p no:cacheprovider -n "$PROCESSES" "$@"

PG_URL=${SENDIT_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/sendit}
REDIS_URL=${SENDIT_TEST_REDIS_URL:-redis://127.0.0.1:6379/15}
if .venv/bin/python scripts/services_up.py "$PG_URL" "$REDIS_URL"; then
    echo "== pytest on PostgreSQL + RedisHuey (database tests)" >&2
    DATABASE_URL="$PG_URL" SENDIT_QUEUE_URL="$REDIS_URL" .venv/bin/python -m pytest -q -p no:cacheprovider -n "$PROCESSES" -m db "$@"
elif [ "${CI:-}" = "true" ]; then
    echo "PostgreSQL or Redis is not reachable, and CI=true requires both" >&2
    exit 1
else
    echo "== PostgreSQL or Redis not reachable: the second pass is skipped (required under CI=true)" >&2
fi

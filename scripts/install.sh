#!/usr/bin/env bash
# Production install (idempotent) on a fresh Debian machine with Python >= 3.11: Sendit and its runtime
# dependencies only, in .venv. No Debian package is installed or stopped, no service touched: Sendit
# talks to the Orthanc you already run (or to a folder); the test tools come with scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q .
echo "install: ready (.venv/bin/sendit)" >&2

#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh Debian machine with Python >= 3.11:
# system packages (Orthanc, DCMTK, dicom3tools) when we are root, then a virtualenv in .venv
# with Sendit and its development tools installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
command -v storescu >/dev/null 2>&1 || need_apt+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need_apt+=(dicom3tools)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing ${need_apt[*]} from Debian" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
        # Debian starts a system Orthanc on 4242/8042; Sendit's tests start their own.
        (systemctl stop orthanc || service orthanc stop || pkill -x Orthanc) >/dev/null 2>&1 || true
    else
        echo "setup: not root; install ${need_apt[*]} yourself for the Orthanc tests" >&2
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup: ready (.venv)" >&2

#!/usr/bin/env bash
# Production install (idempotent) on a fresh Debian machine with Python >= 3.11: Sendit and its runtime
# dependencies only, in .venv. One Debian package, tesseract-ocr (OCR of images that may show burned-in
# text, docs/deidentification.md), is installed when it is missing and we are root; nothing else is
# installed, and nothing is stopped or restarted: Sendit talks to the Orthanc you already run (or to a
# folder); the test tools come with scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v tesseract >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "install: installing tesseract-ocr from Debian (OCR of burned-in text)" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr >/dev/null
    else
        echo "install: tesseract not found; until root runs 'apt-get install tesseract-ocr'," \
            "images that may show burned-in text are quarantined" >&2
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q .
echo "install: ready (.venv/bin/sendit)" >&2

#!/usr/bin/env bash
# Developer set-up (idempotent), used by scripts/test.sh: the Debian packages the tests talk to
# (Orthanc and its DICOMweb plugin, DCMTK, dicom3tools, Chromium, tesseract-ocr, faketime) when we are root,
# then .venv with Sendit in editable mode and its development tools. It never stops or reconfigures a service:
# the tests start their own Orthanc on free loopback ports, so a system Orthanc (maybe the site's PACS) is
# left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
command -v storescu >/dev/null 2>&1 || need_apt+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need_apt+=(dicom3tools)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v tesseract >/dev/null 2>&1 || need_apt+=(tesseract-ocr)
command -v faketime >/dev/null 2>&1 || need_apt+=(faketime)  # tests/test_many_hosts.py: a host's skewed clock
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing ${need_apt[*]} from Debian" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "setup: not root; install ${need_apt[*]} yourself for the Orthanc, browser and OCR tests" >&2
    fi
fi

# Google's Datastore emulator (the Google destination's tests) comes from Google's apt repository
# (packages.cloud.google.com), not Debian's: installed where apt knows it, otherwise named. Without it
# those tests skip, except with CI=true, where they fail.
if [ ! -x /usr/lib/google-cloud-sdk/platform/cloud-datastore-emulator/cloud_datastore_emulator ]; then
    if [ "$(id -u)" = 0 ] && apt-cache show google-cloud-cli-datastore-emulator >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq google-cloud-cli-datastore-emulator >/dev/null
    else
        echo "setup: install google-cloud-cli-datastore-emulator (Google's apt repository) for the Google tests" >&2
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup: ready (.venv, with development tools)" >&2

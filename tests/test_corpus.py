"""Real-world variety: pydicom's own test files (several vendors, compressed syntaxes, big endian,
deflate, multi-frame, RT, SR, waveforms, DICOMDIRs and deliberately broken files)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest

from sendit.relay.models import IN_FLIGHT, Image, ReceivedFile, Status
from tests.helpers import ingest_and_run

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]  # the whole corpus, end to end
CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"


def test_every_file_ends_in_a_visible_state_with_a_reason(sendit_dirs: dict[str, Path], reconfigure: Any) -> None:
    # This test is about encodings reaching the destination; the burned-in text filter (which
    # quarantines secondary captures and ultrasound) has its own tests in test_deid_pixels.py.
    reconfigure(DEID_FILTER="none")
    target = sendit_dirs["INPUT_FOLDER"] / "corpus"
    shutil.copytree(CORPUS, target)
    arrived = [path for path in target.rglob("*") if path.is_file() and not path.name.startswith(".")]
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    recorded = Image.objects.count() + ReceivedFile.objects.count()
    assert recorded == len(arrived)  # every file accounted for: no silent drop
    assert not Image.objects.filter(status__in=IN_FLIGHT).exists()
    assert not Image.objects.exclude(status=Status.DONE).filter(reason="").exists()
    assert not ReceivedFile.objects.filter(reason="").exists()
    done = set(Image.objects.filter(status=Status.DONE).values_list("path", flat=True))
    for name in (
        "693_J2KI.dcm",
        "JPEG-lossy.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "ExplVR_BigEnd.dcm",
        "image_dfl.dcm",
        "liver_1frame.dcm",
        "rtplan.dcm",
        "test-SR.dcm",
        "waveform_ecg.dcm",
    ):
        assert f"corpus/{name}" in done, name  # JPEG 2000, JPEG, big endian, deflate, multi-frame, RT, SR, ECG
    # several test files reuse one SOPInstanceUID with other content: conflicts, quarantined with that reason
    assert ReceivedFile.objects.filter(reason__startswith="conflict").count() > 0
    assert ReceivedFile.objects.filter(reason__startswith="not a DICOM file").count() > 0
    # nothing that left is identifiable by the originals' PatientID
    outputs = list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))
    assert len(outputs) == len(done)
    for path in outputs[:40]:
        assert pydicom.dcmread(path, stop_before_pixels=True).PatientIdentityRemoved == "YES"
    # whatever was not delivered waits in quarantine (or skipped/), never deleted
    kept = list(sendit_dirs["QUARANTINE_FOLDER"].rglob("*")) + list((sendit_dirs["DATA_DIR"] / "skipped").rglob("*"))
    assert len([p for p in kept if p.is_file()]) == len(arrived) - len(done)

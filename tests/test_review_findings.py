"""Failure paths found in review: each must end in a visible state, and nothing may be lost."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from sendit.identifiers.base import Identifiers, SeriesHeader
from sendit.relay import ingest as ingest_module
from sendit.relay.ingest import ingest_folder
from sendit.relay.inline import run_inline
from sendit.relay.models import Image, ReceivedFile, Series, Status
from tests.helpers import demo_into, ingest_and_run, statuses

pytestmark = pytest.mark.django_db(transaction=True)


def test_no_destination_is_never_done_and_keeps_the_originals(sendit_dirs: dict[str, Path], reconfigure: Any) -> None:
    reconfigure(OUTPUT_FOLDER=None, SEND_TO_ORTHANC=False, ORTHANC_URL="")
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert statuses() == {Status.ERROR: len(written)}
    assert all("no destination" in s.last_error for s in Series.objects.all())
    assert all(path.exists() for path in written)


def test_clean_up_never_removes_a_new_file_at_a_reused_path(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=1)
    blobs = {path: path.read_bytes() for path in written}
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    reused = written[0]
    newcomer = pydicom.dcmread(io.BytesIO(blobs[reused]))
    newcomer.SeriesInstanceUID, newcomer.SOPInstanceUID = generate_uid(), generate_uid()
    newcomer.file_meta.MediaStorageSOPInstanceUID = newcomer.SOPInstanceUID
    reused.parent.mkdir(parents=True, exist_ok=True)
    newcomer.save_as(reused)  # the producer re-used a file name
    sibling = pydicom.dcmread(io.BytesIO(blobs[reused]))  # and the old series grew by one image
    sibling.SOPInstanceUID = generate_uid()
    sibling.file_meta.MediaStorageSOPInstanceUID = sibling.SOPInstanceUID
    sibling.save_as(reused.parent / "IM99999.dcm")
    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])
    assert report.images == 2
    run_inline(sorted(report.series_ids), workers=1)
    assert statuses() == {Status.DONE: len(written) + 2}


def test_a_concurrent_scan_of_the_same_file_changes_nothing(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=1)
    ingest_folder(sendit_dirs["INPUT_FOLDER"])  # `sendit import` ...
    monkeypatch.setattr(ingest_module, "known_paths", lambda: {})  # ... and a scan that read before it
    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])
    monkeypatch.undo()
    assert (report.images, report.skipped, report.quarantined) == (0, 0, 0)
    assert ReceivedFile.objects.count() == 0
    assert all(path.exists() for path in written)
    run_inline(sorted(report.resumable), workers=1)
    assert statuses() == {Status.DONE: len(written)}


def test_a_new_file_where_a_quarantined_one_was_is_ingested(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    victim = written[0]
    good = victim.read_bytes()
    broken = pydicom.dcmread(victim)
    broken.StudyDate = "2021-13-45"
    broken.save_as(victim)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert statuses()[Status.QUARANTINED] == 1
    fresh = pydicom.dcmread(io.BytesIO(good))
    fresh.SOPInstanceUID = generate_uid()
    fresh.file_meta.MediaStorageSOPInstanceUID = fresh.SOPInstanceUID
    victim.parent.mkdir(parents=True, exist_ok=True)
    fresh.save_as(victim)
    report = ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert report.images == 1
    assert statuses() == {Status.DONE: len(written), Status.QUARANTINED: 1}


class KeyErrorProvider:
    """A custom provider with a bug whose message quotes a patient value."""

    def __init__(self, settings: Any = None) -> None:
        pass

    def identify(self, series: list[SeriesHeader]) -> dict[str, Identifiers]:
        raise KeyError(series[0].patient_id)


def test_an_unexpected_exception_is_retried_then_shown_without_its_text(
    sendit_dirs: dict[str, Path], reconfigure: Any, caplog: pytest.LogCaptureFixture
) -> None:
    reconfigure(IDENTIFIER_PROVIDER="tests.test_review_findings.KeyErrorProvider", MAX_ATTEMPTS=2)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=1)
    patient_id = str(pydicom.dcmread(written[0]).PatientID)
    with caplog.at_level(logging.DEBUG):
        ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert statuses() == {Status.ERROR: len(written)}
    assert all("unexpected error (KeyError)" in s.last_error for s in Series.objects.all())
    assert patient_id not in caplog.text
    assert not Image.objects.filter(reason__contains=patient_id).exists()


def test_prune_keeps_what_still_needs_a_person(sendit_dirs: dict[str, Path]) -> None:
    from sendit.relay.housekeeping import prune

    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    broken = pydicom.dcmread(written[0])
    broken.StudyDate = "2021-13-45"
    broken.save_as(written[0])
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    quarantined_series = Image.objects.get(status=Status.QUARANTINED).series_id
    prune(retention_days=0)
    assert Series.objects.filter(pk=quarantined_series).exists()
    assert Series.objects.count() == 1

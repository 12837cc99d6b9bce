"""The pipeline on the embedded default: folder in, de-identified folder out, every file accounted for."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from sendit.identifiers.base import IdentifierError, Identifiers, SeriesHeader
from sendit.relay.housekeeping import file_counts, prune, retry_errors, status_counts
from sendit.relay.ingest import ingest_folder
from sendit.relay.inline import run_inline
from sendit.relay.models import (
    Delivery,
    Event,
    Image,
    ReceivedFile,
    Series,
    SeriesIdentifiers,
    Status,
    Study,
    Summary,
)
from tests.helpers import all_bytes, demo_into, ingest_and_run, statuses

pytestmark = pytest.mark.django_db(transaction=True)


def phi_values(files: list[Path]) -> set[bytes]:
    values: set[bytes] = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        values |= {str(ds.PatientID).encode(), str(ds.PatientName).encode(), str(ds.AccessionNumber).encode()}
        values |= {str(ds.PatientAddress).encode(), str(ds.SOPInstanceUID).encode(), str(ds.StudyInstanceUID).encode()}
    return values


def test_demo_folder_ends_done_with_no_phi_in_output_or_paths(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"])
    phi = phi_values(written)
    report = ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert report.images == len(written)
    assert statuses() == {Status.DONE: len(written)}
    outputs = sorted(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))
    assert len(outputs) == len(written)
    blob = all_bytes(sendit_dirs["OUTPUT_FOLDER"])
    paths = "\n".join(str(p) for p in sendit_dirs["OUTPUT_FOLDER"].rglob("*")).encode()
    for value in phi:
        assert value not in blob
        assert value not in paths
    # the identifiers were stored per series before de-identification, and drove the output
    for series in Series.objects.all():
        stored = Identifiers.from_json(SeriesIdentifiers.objects.get(series=series).response)
        out = pydicom.dcmread(next(sendit_dirs["OUTPUT_FOLDER"].rglob(f"{series.deid_series_uid}/*.dcm")))
        assert out.PatientID == stored.patient_id and out.AccessionNumber == stored.accession_number
        assert stored.jitter_days != 0
    # clean-up: originals and working copies are gone, the input folder is empty again
    assert list(sendit_dirs["INPUT_FOLDER"].iterdir()) == []
    assert list(sendit_dirs["WORK_FOLDER"].rglob("*.dcm")) == []
    # every change is in the event log
    assert Event.objects.filter(to_status=Status.DONE, image__isnull=False).count() == len(written)


def test_same_patient_gets_same_pseudonym_and_shift_across_series(sendit_dirs: dict[str, Path]) -> None:
    demo_into(sendit_dirs["INPUT_FOLDER"], patients=2)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    by_patient: dict[str, set[tuple[str, int]]] = {}
    for series in Series.objects.all():
        ids = Identifiers.from_json(series.identifiers.response)
        by_patient.setdefault(series.header["patient_id"], set()).add((ids.patient_id, ids.jitter_days))
    assert len(by_patient) == 2
    assert all(len(values) == 1 for values in by_patient.values())
    assert len({next(iter(v)) for v in by_patient.values()}) == 2


def test_tmp_folder_is_never_ingested_until_renamed(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1)
    study = written[0].parents[1]
    hidden = study.with_name(study.name + ".tmp123")
    study.rename(hidden)
    nested = sendit_dirs["INPUT_FOLDER"] / "batch" / "part.tmpA"
    nested.mkdir(parents=True)
    shutil.copy(next(hidden.rglob("*.dcm")), nested / "x.dcm")
    assert ingest_folder(sendit_dirs["INPUT_FOLDER"]).images == 0
    assert Image.objects.count() == 0
    hidden.rename(study)
    assert ingest_folder(sendit_dirs["INPUT_FOLDER"]).images == len(list(study.rglob("*.dcm")))


def test_rejected_files_are_quarantined_with_reason_and_the_batch_goes_on(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1)
    folder = written[0].parent
    (folder / "notes.txt").write_text("not dicom at all")
    data = written[1].read_bytes()
    (folder / "broken.dcm").write_bytes(data[: len(data) - 500])
    report = ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert report.rejected == 2
    reasons = dict(ReceivedFile.objects.values_list("path", "reason"))
    rel = folder.relative_to(sendit_dirs["INPUT_FOLDER"])
    assert "not a DICOM file" in reasons[str(rel / "notes.txt")]
    assert "truncated" in reasons[str(rel / "broken.dcm")]
    assert (sendit_dirs["QUARANTINE_FOLDER"] / rel / "notes.txt").exists()
    assert statuses() == {Status.DONE: len(written)}
    assert file_counts()[Status.QUARANTINED] == 2 and status_counts()[Status.QUARANTINED] == 0  # apart


def test_duplicate_in_flight_is_skipped_and_conflict_quarantined(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1)
    assert ingest_folder(sendit_dirs["INPUT_FOLDER"]).images == len(written)
    second = sendit_dirs["INPUT_FOLDER"] / "again"
    second.mkdir()
    shutil.copy(written[0], second / "same.dcm")
    ds = pydicom.dcmread(written[1])
    ds.SeriesDescription = "changed content"
    ds.save_as(second / "changed.dcm")
    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])
    assert (report.images, report.skipped, report.quarantined) == (0, 1, 1)
    received = {r.path: r for r in ReceivedFile.objects.all()}
    assert received["again/same.dcm"].status == Status.SKIPPED and "duplicate" in received["again/same.dcm"].reason
    assert received["again/changed.dcm"].status == Status.QUARANTINED
    assert "conflict" in received["again/changed.dcm"].reason


def test_arriving_again_after_done_is_processed_again_onto_the_same_output(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    keep = sendit_dirs["DATA_DIR"] / "copy"
    shutil.copytree(sendit_dirs["INPUT_FOLDER"], keep)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    before = sorted(p.relative_to(sendit_dirs["OUTPUT_FOLDER"]) for p in sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))
    shutil.copytree(keep, sendit_dirs["INPUT_FOLDER"], dirs_exist_ok=True)
    report = ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert report.reprocessed == len(written)
    after = sorted(p.relative_to(sendit_dirs["OUTPUT_FOLDER"]) for p in sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))
    assert after == before
    assert statuses() == {Status.DONE: len(written)}


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


class FailingProvider:
    """A provider that is down (retryable) or answers wrongly (permanent), for the failure paths."""

    retryable = True

    def __init__(self, settings: Any = None) -> None:
        pass

    def identify(self, series: list[SeriesHeader]) -> dict[str, Identifiers]:
        raise IdentifierError("service unavailable (HTTP 503)", retryable=FailingProvider.retryable)


def test_identifier_failure_is_an_error_never_a_pass_through(sendit_dirs: dict[str, Path], reconfigure: Any) -> None:
    reconfigure(IDENTIFIER_PROVIDER="tests.test_pipeline.FailingProvider", MAX_ATTEMPTS=3)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert statuses() == {Status.ERROR: len(written)}
    series = Series.objects.first()
    assert series is not None and "gave up after 3 attempts" in series.last_error
    assert list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm")) == []
    assert all(path.exists() for path in written)  # nothing lost: originals wait for a retry
    reconfigure(IDENTIFIER_PROVIDER="")
    run_inline(retry_errors(), workers=1)
    assert statuses() == {Status.DONE: len(written)}


class KeyErrorProvider:
    """A custom provider with a bug whose message quotes a patient value."""

    def __init__(self, settings: Any = None) -> None:
        pass

    def identify(self, series: list[SeriesHeader]) -> dict[str, Identifiers]:
        raise KeyError(series[0].patient_id)


def test_an_unexpected_exception_is_retried_then_shown_without_its_text(
    sendit_dirs: dict[str, Path], reconfigure: Any, caplog: pytest.LogCaptureFixture
) -> None:
    reconfigure(IDENTIFIER_PROVIDER="tests.test_pipeline.KeyErrorProvider", MAX_ATTEMPTS=2)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=1)
    patient_id = str(pydicom.dcmread(written[0]).PatientID)
    with caplog.at_level(logging.DEBUG):
        ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert statuses() == {Status.ERROR: len(written)}
    assert all("unexpected error (KeyError)" in s.last_error for s in Series.objects.all())
    assert patient_id not in caplog.text
    assert not Image.objects.filter(reason__contains=patient_id).exists()


def test_deid_failure_quarantines_only_that_image(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=3)
    bad = pydicom.dcmread(written[0])
    bad.StudyDate = "2021-13-45"  # not a DICOM date: cannot be shifted, so it cannot be released
    bad.save_as(written[0])
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    image = Image.objects.get(path=str(written[0].relative_to(sendit_dirs["INPUT_FOLDER"])))
    assert image.status == Status.QUARANTINED and "de-identification failed" in image.reason
    assert "2021-13-45" not in image.reason
    assert statuses()[Status.DONE] == len(written) - 1
    assert len(list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))) == len(written) - 1
    assert (sendit_dirs["QUARANTINE_FOLDER"] / image.path).exists()


def test_destination_down_retries_then_delivers_without_duplicates(
    sendit_dirs: dict[str, Path], reconfigure: Any
) -> None:
    blocked = sendit_dirs["DATA_DIR"] / "out-file"
    blocked.write_text("a file where the output folder should be: writes fail")
    reconfigure(OUTPUT_FOLDER=blocked / "sub", MAX_ATTEMPTS=2)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    report = ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert statuses() == {Status.ERROR: len(written)}
    assert all("folder write failed" in s.last_error for s in Series.objects.all())
    reconfigure(OUTPUT_FOLDER=sendit_dirs["OUTPUT_FOLDER"])
    run_inline(retry_errors(), workers=1)
    assert statuses() == {Status.DONE: len(written)}
    assert len(list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))) == len(written)
    assert Delivery.objects.count() == len(written)
    assert len(report.series_ids) == Series.objects.count()


def test_no_destination_is_never_done_and_keeps_the_originals(sendit_dirs: dict[str, Path], reconfigure: Any) -> None:
    reconfigure(OUTPUT_FOLDER=None, SEND_TO_ORTHANC=False, ORTHANC_URL="")
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    assert statuses() == {Status.ERROR: len(written)}
    assert all("no destination" in s.last_error for s in Series.objects.all())
    assert all(path.exists() for path in written)


def test_restart_in_the_middle_loses_nothing(sendit_dirs: dict[str, Path]) -> None:
    """State as a killed worker leaves it: a stale lease, images half-way; the requeue finishes them."""
    from datetime import timedelta

    from django.utils import timezone

    from sendit.relay.tasks import stale_series

    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=4)
    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])
    series_id = next(iter(sorted(report.series_ids)))
    images = list(Image.objects.filter(series_id=series_id).order_by("id"))
    Image.objects.filter(pk=images[0].pk).update(status=Status.PROCESSING)
    past = timezone.now() - timedelta(hours=1)
    Series.objects.filter(pk=series_id).update(lease_owner="dead-worker", lease_expires=past, enqueued_at=past)
    assert set(report.series_ids) == set(stale_series())  # never enqueued, or enqueued by a dead worker
    run_inline(stale_series(), workers=1)
    assert statuses() == {Status.DONE: len(written)}
    assert len(list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))) == len(written)


def test_live_lease_keeps_a_second_worker_out(sendit_dirs: dict[str, Path]) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from sendit.relay.pipeline import process_series

    demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=1)
    series_id = next(iter(ingest_folder(sendit_dirs["INPUT_FOLDER"]).series_ids))
    Series.objects.filter(pk=series_id).update(lease_owner="other", lease_expires=timezone.now() + timedelta(minutes=5))
    assert process_series(series_id).busy
    assert set(Image.objects.filter(series_id=series_id).values_list("status", flat=True)) == {Status.NEW}
    assert list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm")) == []


def test_prune_keeps_a_phi_free_summary(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    series_count = Series.objects.count()
    assert prune(retention_days=0) == series_count
    assert Series.objects.count() == 0 and Image.objects.count() == 0
    summaries = list(Summary.objects.all())
    assert sum(s.images for s in summaries) == len(written)
    # every row that held an identifier is gone: studies, series headers, identifier responses, events
    assert not Study.objects.exists() and not SeriesIdentifiers.objects.exists()
    assert not Event.objects.filter(image__isnull=False).exists()


def test_prune_keeps_what_still_needs_a_person(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    broken = pydicom.dcmread(written[0])
    broken.StudyDate = "2021-13-45"
    broken.save_as(written[0])
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])
    quarantined_series = Image.objects.get(status=Status.QUARANTINED).series_id
    prune(retention_days=0)
    assert Series.objects.filter(pk=quarantined_series).exists()
    assert Series.objects.count() == 1


def test_import_wait_tallies_only_what_it_imported(
    sendit_dirs: dict[str, Path], reconfigure: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sendit import --wait` judges its own series with the tally `sendit status` shows for all."""
    from sendit.cli import _import
    from sendit.relay.housekeeping import images_per_status

    reconfigure(IDENTIFIER_PROVIDER="tests.test_pipeline.FailingProvider", MAX_ATTEMPTS=1)
    earlier = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=1)
    ingest_and_run(sendit_dirs["INPUT_FOLDER"])  # an earlier batch still waits in ERROR
    reconfigure(IDENTIFIER_PROVIDER="")
    later = demo_into(sendit_dirs["DATA_DIR"] / "later", patients=1, images=2)
    capsys.readouterr()

    assert _import([sendit_dirs["DATA_DIR"] / "later"], wait=True, workers=1) == 0

    assert f"result: DONE {len(later)}\n" in capsys.readouterr().err
    assert images_per_status() == {Status.ERROR: len(earlier), Status.DONE: len(later)}
    assert status_counts()[Status.ERROR] == len(earlier)

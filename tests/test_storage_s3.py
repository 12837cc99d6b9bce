"""Originals in an S3 bucket (STORAGE_URL = s3://bucket/prefix): workers need no shared folder.

The bucket is moto's S3 server on loopback, a stand-in for a real S3 store (AWS, MinIO, Ceph),
started by tests/s3.py and stopped by its PID. Its Gate (a TCP relay in front of it) makes the
bucket unreachable and brings it back while moto keeps every object. Working copies are in
WORK_FOLDER, each host's local scratch.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client

from sendit.relay import files, pipeline
from sendit.relay.housekeeping import prune
from sendit.relay.ingest import ingest_folder
from sendit.relay.inline import run_inline
from sendit.relay.models import Delivery, Event, Image, ReceivedFile, Series, Status
from sendit.relay.roles import assign
from sendit.storage import StoreError
from tests.helpers import demo_into, statuses
from tests.s3 import Bucket, Gate

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def bucket(s3_bucket: Bucket, reconfigure: Any) -> Bucket:
    """Sendit configured to keep originals in a fresh bucket on the stand-in server."""
    reconfigure(**s3_bucket.settings)
    return s3_bucket


def gate_of(bucket: Bucket) -> Gate:
    assert bucket.gate is not None
    return bucket.gate


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def input_files(folders: dict[str, Path]) -> list[Path]:
    return sorted(path for path in folders["INPUT_FOLDER"].rglob("*") if path.is_file())


def outputs(folders: dict[str, Path]) -> list[Path]:
    return sorted(folders["OUTPUT_FOLDER"].rglob("*.dcm"))


def assert_each_image_delivered_once(folders: dict[str, Path], count: int) -> None:
    """Every image DONE, one Delivery each, and the destination holds exactly that many instances."""
    assert statuses() == {Status.DONE: count}
    assert Delivery.objects.count() == count
    delivered = [pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in outputs(folders)]
    assert len(delivered) == len(set(delivered)) == count


def test_a_series_goes_done_through_the_bucket_and_leaves_no_original_behind(
    bucket: Bucket, sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=2, images=3)
    digests = {sha256(path) for path in written}
    removals: list[tuple[bool, bool]] = []  # (its row was there, no transaction was open) at each removal
    remove = files.remove_original

    def watched_removal(stored: str) -> None:
        removals.append((Image.objects.filter(path=stored).exists(), not connection.in_atomic_block))
        remove(stored)

    monkeypatch.setattr(files, "remove_original", watched_removal)

    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])

    assert report.images == len(written)
    # each original is in the bucket under its SHA-256, recorded on its row, and gone from the input folder
    assert bucket.keys() == sorted(f"originals/{digest}" for digest in digests)
    assert {(image.stored_key, image.sha256) for image in Image.objects.all()} == {
        (f"originals/{digest}", digest) for digest in digests
    }
    assert input_files(sendit_dirs) == []
    # ... removed only once its row was committed
    assert len(removals) == len(written) and all(row and committed for row, committed in removals)

    monkeypatch.setattr(files, "remove_original", remove)
    run_inline(report.series_ids, workers=1)

    assert_each_image_delivered_once(sendit_dirs, len(written))
    assert bucket.keys() == []  # clean-up deleted every original from the bucket
    assert list(sendit_dirs["WORK_FOLDER"].rglob("*.dcm")) == []  # and every local scratch file


def test_the_bucket_unreachable_at_ingest_leaves_every_file_in_place_until_it_is_back(
    bucket: Bucket, sendit_dirs: dict[str, Path]
) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=3)
    gate_of(bucket).close()

    with pytest.raises(StoreError, match="storage bucket: upload failed"):
        ingest_folder(sendit_dirs["INPUT_FOLDER"])  # the scan fails as a whole; the watcher records it

    assert input_files(sendit_dirs) == sorted(written)
    assert not Image.objects.exists() and not ReceivedFile.objects.exists()

    gate_of(bucket).open()
    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])
    assert report.images == len(written) and input_files(sendit_dirs) == []
    run_inline(report.series_ids, workers=1)
    assert_each_image_delivered_once(sendit_dirs, len(written))
    assert bucket.keys() == []


def test_the_bucket_unreachable_mid_run_makes_the_series_wait_then_finish_with_nothing_lost_or_doubled(
    bucket: Bucket, sendit_dirs: dict[str, Path]
) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=2, images=3)
    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])
    first, *others = sorted(report.series_ids)
    assert pipeline.process_series(first).finished  # one series done before the outage

    gate_of(bucket).close()
    for series_id in others:
        step = pipeline.process_series(series_id)
        assert not step.finished and step.retry_in is not None  # waits and retries, nothing given up
    waiting = Series.objects.get(pk=others[0])
    assert waiting.attempts == 1 and "storage bucket: download failed" in waiting.last_error
    assert set(waiting.images.values_list("status", flat=True)) <= {Status.NEW, Status.PROCESSING}
    assert len(bucket.keys()) == len(written) - 3  # the originals still wait in the bucket

    gate_of(bucket).open()
    run_inline(others, workers=1)

    assert_each_image_delivered_once(sendit_dirs, len(written))
    assert bucket.keys() == []
    assert not Event.objects.filter(from_status=Status.DONE).exists()  # nothing left DONE again


def test_a_lost_scratch_copy_is_made_again_in_the_same_run_without_costing_an_attempt(
    bucket: Bucket, sendit_dirs: dict[str, Path]
) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=3)
    series_ids = sorted(ingest_folder(sendit_dirs["INPUT_FOLDER"]).series_ids)
    for series in Series.objects.filter(pk__in=series_ids):
        lease = pipeline.acquire_lease(series.pk, pipeline.lease_owner_name())
        assert lease is not None
        with pipeline.LeaseKeeper(lease) as keeper:  # a worker de-identifies, then its host loses the scratch
            pipeline.deidentify_pending(series, pipeline.ensure_identifiers(series), lease, keeper)
        pipeline.release_lease(lease)
    assert statuses() == {Status.DONEPROCESSING: len(written)}
    for copy in sendit_dirs["WORK_FOLDER"].rglob("*.dcm"):
        copy.unlink()

    for series_id in series_ids:
        step = pipeline.process_series(series_id)
        assert step.finished and step.retry_in is None

    assert list(Series.objects.values_list("attempts", "last_error").distinct()) == [(0, "")]
    assert not Event.objects.filter(reason__startswith="attempt").exists()  # no failed attempt recorded
    assert Event.objects.filter(reason="working copy missing; de-identifying again").count() == len(written)
    assert_each_image_delivered_once(sendit_dirs, len(written))
    assert bucket.keys() == []


def quarantined_in_the_bucket(folders: dict[str, Path]) -> tuple[Image, int]:
    """A demo series in which one file has a malformed StudyDate: the engine quarantines that image,
    whose original stays in the bucket under its key."""
    written = demo_into(folders["INPUT_FOLDER"], patients=1, images=2)
    broken = pydicom.dcmread(written[0])
    broken.StudyDate = "2021-13-45"
    broken.save_as(written[0])
    report = ingest_folder(folders["INPUT_FOLDER"])
    run_inline(report.series_ids, workers=1)
    image = Image.objects.get(status=Status.QUARANTINED)
    assert "StudyDate" in image.reason and image.set_aside_at == ""
    return image, len(written)


def person(role: str) -> User:
    """Someone with ``role`` (operator: retry, release, resolve with this copy; reviewer: discard, review)."""
    made = User.objects.create_user(f"{role}-1", password="a-long-password-for-this-person")
    assign(made, role)
    return made


def browser_of(role: str) -> Client:
    browser = Client()
    browser.force_login(person(role))
    return browser


def dashboard_post(image: Image, action: str) -> None:
    """What a person does on the series page (the web view and its action)."""
    browser = browser_of("reviewer" if action == "discard" else "operator")
    response = browser.post(f"/series/{image.series_id}/{action}")
    assert response.status_code == 302


def test_a_quarantined_image_released_from_the_dashboard_is_delivered_from_the_bucket(
    bucket: Bucket, sendit_dirs: dict[str, Path], reconfigure: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, count = quarantined_in_the_bucket(sendit_dirs)
    assert bucket.keys() == [image.stored_key]  # the delivered sibling's original is cleaned up already
    queued: list[int] = []
    monkeypatch.setattr("sendit.relay.tasks.enqueue", lambda ids: queued.extend(ids) or len(queued))
    reconfigure(DEID_OPTIONS="")  # the cause, fixed by a person: dates are removed, not shifted

    dashboard_post(image, "release")

    assert Image.objects.get(pk=image.pk).status == Status.NEW and queued == [image.series_id]
    run_inline(queued, workers=1)  # what a worker, on any host, does with the queued series
    assert_each_image_delivered_once(sendit_dirs, count)
    assert bucket.keys() == []


def test_a_quarantined_image_discarded_from_the_dashboard_leaves_the_bucket(
    bucket: Bucket, sendit_dirs: dict[str, Path]
) -> None:
    image, _ = quarantined_in_the_bucket(sendit_dirs)

    dashboard_post(image, "discard")

    assert Image.objects.get(pk=image.pk).status == Status.SKIPPED
    assert bucket.keys() == []


def test_a_reviewer_sees_a_quarantined_original_read_from_the_bucket(
    bucket: Bucket, sendit_dirs: dict[str, Path]
) -> None:
    image, _ = quarantined_in_the_bucket(sendit_dirs)
    assert not (sendit_dirs["QUARANTINE_FOLDER"] / image.path).exists()  # no local copy anywhere

    page = browser_of("reviewer").get(f"/images/{image.pk}/review")

    assert page.status_code == 200
    text = page.content.decode()
    assert "the original is gone" not in text and "cannot be read" not in text
    assert "2021-13-45" in text  # the malformed StudyDate, read from the original in the bucket


def test_a_conflict_resolved_with_this_copy_puts_it_in_the_bucket_and_delivers_it(
    bucket: Bucket, sendit_dirs: dict[str, Path], reconfigure: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sendit.web import rejected

    image, count = quarantined_in_the_bucket(sendit_dirs)
    repaired = pydicom.dcmread(io.BytesIO(bucket.read(image.stored_key)))
    repaired.StudyDate = "20210301"  # a person's repaired copy of the same instance arrives
    repaired.save_as(sendit_dirs["INPUT_FOLDER"] / "repaired.dcm")
    ingest_folder(sendit_dirs["INPUT_FOLDER"])
    row = ReceivedFile.objects.get(reason__startswith="conflict")
    queued: list[int] = []
    monkeypatch.setattr("sendit.relay.tasks.enqueue", lambda ids: queued.extend(ids) or len(queued))
    old_key = image.stored_key

    outcome = rejected.perform("resolve", row, person("operator"), winner="this")

    assert outcome.problems == [] and outcome.changed == 1
    image.refresh_from_db()
    assert image.stored_key != old_key and bucket.keys() == [image.stored_key]  # the old original is gone
    run_inline(queued, workers=1)
    assert_each_image_delivered_once(sendit_dirs, count)
    assert bucket.keys() == []


def test_retention_deletes_what_a_discard_could_not_while_the_bucket_was_away(
    bucket: Bucket, sendit_dirs: dict[str, Path]
) -> None:
    image, _ = quarantined_in_the_bucket(sendit_dirs)
    gate_of(bucket).close()

    dashboard_post(image, "discard")  # SKIPPED at once; its original stays in the bucket for now

    assert Image.objects.get(pk=image.pk).status == Status.SKIPPED
    prune(0)  # the bucket is still away: this series waits, its original is not forgotten
    assert Series.objects.filter(pk=image.series_id).exists()
    gate_of(bucket).open()
    assert bucket.keys() == [image.stored_key]

    assert prune(0) == 1
    assert bucket.keys() == []
    assert not Series.objects.exists() and not Image.objects.exists()


def test_keep_originals_keeps_them_in_the_bucket_under_their_names(
    bucket: Bucket, sendit_dirs: dict[str, Path], reconfigure: Any
) -> None:
    reconfigure(KEEP_ORIGINALS=True)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    contents = {path.relative_to(sendit_dirs["INPUT_FOLDER"]).as_posix(): path.read_bytes() for path in written}

    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])
    run_inline(report.series_ids, workers=1)

    assert_each_image_delivered_once(sendit_dirs, len(written))
    assert bucket.keys() == sorted(f"kept/{name}" for name in contents)  # originals/ is empty
    assert all(bucket.read(f"kept/{name}") == data for name, data in contents.items())


def test_other_bytes_under_an_originals_key_are_a_conflict_and_are_never_overwritten(
    bucket: Bucket, sendit_dirs: dict[str, Path]
) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    clashing, same, *others = written
    clash_key = f"originals/{sha256(clashing)}"
    bucket.write(clash_key, b"other bytes under this key")
    same_bytes = same.read_bytes()
    same_key = f"originals/{sha256(same)}"
    bucket.write(same_key, same_bytes)  # already there: the same bytes

    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])

    assert report.images == len(written) - 1 and report.rejected == 1
    rejected = ReceivedFile.objects.get()
    assert rejected.status == Status.QUARANTINED
    assert rejected.reason == "conflict: storage bucket holds other content under this original's SHA-256 key"
    assert bucket.read(clash_key) == b"other bytes under this key"  # never overwritten
    assert Path(rejected.stored_at).is_file() and not clashing.exists()  # set aside, not lost
    assert Image.objects.get(sha256=hashlib.sha256(same_bytes).hexdigest()).stored_key == same_key
    assert bucket.read(same_key) == same_bytes and not same.exists()
    assert len(bucket.keys()) == len(written)  # one object each, none written twice


@pytest.mark.parametrize("in_memory", [64 << 20, 0], ids=["read-once", "streamed-from-the-file"])
def test_each_original_is_uploaded_under_the_sha256_of_the_bytes_it_holds(
    bucket: Bucket, sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, in_memory: int
) -> None:
    # up to IN_MEMORY bytes a file is read once for its hash and its upload; a larger one is streamed
    monkeypatch.setattr("sendit.storage.IN_MEMORY", in_memory)
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=3)
    contents = {sha256(path): path.read_bytes() for path in written}

    report = ingest_folder(sendit_dirs["INPUT_FOLDER"])

    assert report.images == len(written)
    assert bucket.keys() == sorted(f"originals/{digest}" for digest in contents)
    assert all(bucket.read(f"originals/{digest}") == data for digest, data in contents.items())
    assert sorted(Image.objects.values_list("sha256", flat=True)) == sorted(contents)
    assert not any(path.exists() for path in written)  # uploaded and recorded: removed from the input


def test_a_create_only_upload_from_memory_or_a_file_keeps_the_first_bytes(bucket: Bucket, tmp_path: Path) -> None:
    from sendit.relay import runtime
    from sendit.storage import StoreConflict

    store = runtime.store()
    assert store is not None
    first = tmp_path / "first.dcm"
    first.write_bytes(b"first bytes")
    digest = hashlib.sha256(b"first bytes").hexdigest()

    assert store.put_new(f"originals/{digest}", b"first bytes", digest) is True
    assert store.put_new(f"originals/{digest}", first, digest) is False  # the same bytes: already there
    with pytest.raises(StoreConflict):
        store.put_new(f"originals/{digest}", b"other bytes", hashlib.sha256(b"other bytes").hexdigest())
    assert bucket.read(f"originals/{digest}") == b"first bytes"


def test_sendit_check_says_whether_the_bucket_answers_without_showing_the_secret(s3_bucket: Bucket) -> None:
    from dataclasses import replace

    from django.conf import settings

    from sendit.checks import storage_finding

    cfg = replace(settings.SENDIT, **s3_bucket.settings)
    assert storage_finding(cfg) == (
        True,
        f"STORAGE_URL s3://{s3_bucket.name}/sendit/ at {gate_of(s3_bucket).endpoint} answers",
        1,
    )

    finding = storage_finding(replace(cfg, STORAGE_URL="s3://no-such-bucket-here/sendit"))
    assert not finding.ok and "listing failed (NoSuchBucket)" in finding.line

    gate_of(s3_bucket).close()
    finding = storage_finding(cfg)
    assert not finding.ok and "listing failed (EndpointConnectionError)" in finding.line
    assert cfg.S3_SECRET_ACCESS_KEY not in finding.line


def test_sendit_import_wait_with_worker_processes_goes_through_the_bucket(s3_bucket: Bucket, tmp_path: Path) -> None:
    """The real command, as a user runs it: its forked workers each reach the bucket on their own."""
    from tests.test_cli import cli_env, sendit

    (tmp_path / "sendit.toml").write_text(
        'SECRET_KEY = "s3-test-secret-key-0123456789-abcdefghijkl"\nDATA_DIR = "data"\n'
    )
    incoming = tmp_path / "data" / "input" / "batch"
    written = demo_into(incoming, patients=2, images=3)

    result = sendit(tmp_path, "import", str(incoming), "--wait", env=cli_env(tmp_path, **s3_bucket.env))

    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "data" / "output").rglob("*.dcm"))) == len(written)
    assert [path for path in incoming.rglob("*") if path.is_file()] == []  # uploaded, then removed
    assert s3_bucket.keys() == []  # and cleaned up from the bucket after DONE
    assert s3_bucket.settings["S3_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr


def test_an_instance_received_over_dicom_is_uploaded_and_recorded_before_success(
    bucket: Bucket, sendit_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The listener's path (sendit.relay.received.keep) with originals in the bucket: what it returns
    for is in the bucket and recorded, and no local copy is left; with the bucket unreachable it
    raises (the listener answers 0xA701) and the durable file is recorded once the bucket is back."""
    from pydicom.uid import generate_uid

    from sendit.relay import received
    from tests.orthanc import write_ct

    data = write_ct(tmp_path / "a.dcm", series_uid=generate_uid()).read_bytes()
    report = received.keep(data)
    image = Image.objects.get()
    assert report.images == 1 and image.stored_key and image.sha256 == hashlib.sha256(data).hexdigest()
    assert bucket.read(image.stored_key) == data
    assert input_files(sendit_dirs) == []  # uploaded and recorded: the local copy went

    second = write_ct(tmp_path / "b.dcm", series_uid=generate_uid()).read_bytes()
    gate_of(bucket).close()
    with pytest.raises(StoreError):
        received.keep(second)
    connection.close()
    assert Image.objects.count() == 1 and len(input_files(sendit_dirs)) == 1  # durable, not recorded
    gate_of(bucket).open()
    assert received.recover().images == 1  # the next start (the sender's retry would be SKIPPED)
    assert Image.objects.count() == 2 and input_files(sendit_dirs) == []

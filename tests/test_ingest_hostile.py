"""A hostile input folder: one bad entry never stops ingestion, links are never followed, names that
are not UTF-8 are kept, a rescan never races clean-up or another scan, a name used again is a new file,
and every scan's outcome is visible."""

from __future__ import annotations

import io
import logging
import os
import shutil
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from django.db import OperationalError
from django.utils import timezone
from pydicom.uid import generate_uid

from sendit.relay import files
from sendit.relay import ingest as ingest_module
from sendit.relay.ingest import complete_files, ingest_folder, ingest_paths
from sendit.relay.inline import run_inline
from sendit.relay.models import Event, Image, ReceivedFile, ScanState, Status
from tests.helpers import demo_into, ingest_and_run, statuses

pytestmark = pytest.mark.django_db(transaction=True)

SYMLINK = "symbolic link; not followed"


def ten_valid(inbox: Path) -> list[Path]:
    written = demo_into(inbox / "good", patients=1, images=5)
    assert len(written) == 10
    return written


def spare(sendit_dirs: dict[str, Path], images: int = 1) -> list[Path]:
    """Valid files with their own UIDs, made outside the input folder."""
    return demo_into(sendit_dirs["DATA_DIR"] / f"spare-{images}", patients=1, images=images)


def test_a_symlink_loop_beside_valid_files_stops_nothing(sendit_dirs: dict[str, Path]) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    ten_valid(inbox)
    os.symlink("b", inbox / "a")
    os.symlink("a", inbox / "b")
    report = ingest_folder(inbox)
    assert report.images == 10
    assert sorted(ReceivedFile.objects.values_list("path", "reason")) == [("a", SYMLINK), ("b", SYMLINK)]
    # the links themselves went to quarantine, as links
    assert (sendit_dirs["QUARANTINE_FOLDER"] / "a").is_symlink() and not os.path.lexists(inbox / "a")
    assert ingest_folder(inbox).problems == []  # and are not recorded again


def test_an_unknown_vr_is_a_clean_rejection_without_the_value(
    sendit_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    ten_valid(inbox)
    source = spare(sendit_dirs)[0]
    name = str(pydicom.dcmread(source).PatientName)
    data = source.read_bytes()
    at = data.index(b"\x10\x00\x10\x00PN")  # PatientName, explicit VR little endian
    (inbox / "zz.dcm").write_bytes(data[: at + 4] + b"ZZ" + data[at + 6 :])
    with caplog.at_level(logging.DEBUG):
        report = ingest_folder(inbox)
    assert report.images == 10
    row = ReceivedFile.objects.get()
    assert (row.path, row.status) == ("zz.dcm", Status.QUARANTINED)
    assert row.reason == "unreadable DICOM header (NotImplementedError)"
    assert (sendit_dirs["QUARANTINE_FOLDER"] / "zz.dcm").exists()
    assert name not in caplog.text and name.split("^")[0] not in row.reason


def test_a_name_that_is_not_utf8_is_recorded_escaped_and_processed(sendit_dirs: dict[str, Path]) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    ten_valid(inbox)
    folder = os.fsencode(inbox) + b"/M\xfcller^Hans"
    os.mkdir(folder)
    shutil.copy(spare(sendit_dirs)[0], os.fsdecode(folder + b"/IM1.dcm"))
    with open(folder + b"/notes\xe9.txt", "wb") as handle:
        handle.write(b"not an image")
    ingest_and_run(inbox)
    assert statuses() == {Status.DONE: 11}  # 0 of 10 before: the whole chunk rolled back
    image = Image.objects.get(path="M\\xfcller^Hans/IM1.dcm")
    assert image.cleaned_at is not None and not os.path.lexists(folder + b"/IM1.dcm")  # the pipeline found it
    assert len(list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))) == 11
    row = ReceivedFile.objects.get()
    assert row.path == "M\\xfcller^Hans/notes\\xe9.txt" and row.reason.startswith("not a DICOM file")
    assert row.stored_at.isprintable() and Path(row.stored_at).read_bytes() == b"not an image"
    assert files.original(row.path) == Path(os.fsdecode(folder + b"/notes\xe9.txt"))


def test_escaped_names_lead_back_to_the_same_bytes() -> None:
    for raw in (b"M\xfcller^Hans/IM1.dcm", b"back\\slash\\x41", b"tab\there", "Müller".encode(), b"\xc2\x85\xff"):
        name = os.fsdecode(raw)
        stored = files.escape_name(name)
        assert stored.isprintable() and stored.encode("utf-8")  # storable and printable
        assert os.fsencode(files.real_name(stored)) == raw
    assert files.escape_name("plain/IM1.dcm") == "plain/IM1.dcm" and files.escape_name("Müller") == "Müller"


def test_links_out_of_the_folder_are_never_read_nor_delivered_and_rejected_once(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    ten_valid(inbox)
    outside = spare(sendit_dirs)
    secret_uid = pydicom.dcmread(outside[0]).SOPInstanceUID
    os.symlink("/etc/passwd", inbox / "passwd.dcm")
    os.symlink(outside[0], inbox / "secret.dcm")
    os.symlink(outside[0].parent, inbox / "linked-folder")  # a linked folder is not entered either
    read: list[Path] = []
    real_read = ingest_module.read_header

    def recording(path: Path) -> Any:
        read.append(Path(path))
        return real_read(path)

    monkeypatch.setattr(ingest_module, "read_header", recording)
    for _ in range(3):
        report = ingest_folder(inbox)
        run_inline(sorted(report.series_ids), workers=1)
    assert statuses() == {Status.DONE: 10}
    assert not Image.objects.filter(sop_instance_uid=secret_uid).exists()
    assert len(list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))) == 10
    rows = sorted(ReceivedFile.objects.values_list("path", "reason"))
    assert rows == [("linked-folder", SYMLINK), ("passwd.dcm", SYMLINK), ("secret.dcm", SYMLINK)]
    assert all("good" in path.parts for path in read)  # nothing but the valid files was opened
    assert all(path.exists() for path in outside)  # the targets are untouched
    assert (sendit_dirs["QUARANTINE_FOLDER"] / "secret.dcm").is_symlink()


def test_an_entry_that_cannot_be_moved_is_recorded_once(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    ten_valid(inbox)
    os.symlink("/etc/passwd", inbox / "passwd.dcm")
    (inbox / "notes.txt").write_text("not an image")

    def refuse(*args: Any, **kwargs: Any) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files, "set_aside", refuse)  # quarantine not writable
    reports = [ingest_folder(inbox) for _ in range(3)]
    assert reports[0].images == 10 and reports[0].rejected == 2
    assert sorted(ReceivedFile.objects.values_list("path", "stored_at")) == [("notes.txt", ""), ("passwd.dcm", "")]
    assert [dict(report.ignored) for report in reports[1:]] == [{"rejected_earlier": 2}] * 2
    # a new file at that path later is a new arrival (the row is dated back: no reliance on clock ticks)
    ReceivedFile.objects.filter(path="notes.txt").update(created=timezone.now() - timedelta(minutes=1))
    (inbox / "notes.txt").unlink()
    (inbox / "notes.txt").write_text("another note")
    assert ingest_folder(inbox).rejected == 1


def test_a_special_file_is_rejected_unread(sendit_dirs: dict[str, Path]) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    ten_valid(inbox)
    os.mkfifo(inbox / "pipe.dcm")  # opening it for reading would wait for a writer
    assert ingest_folder(inbox).images == 10
    assert ReceivedFile.objects.get().reason == "not a regular file (a device, pipe or socket)"


def test_a_rescan_leaves_a_done_image_awaiting_clean_up_alone(sendit_dirs: dict[str, Path]) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    written = demo_into(inbox, patients=1, images=2)
    blobs = {path: path.read_bytes() for path in written}
    ingest_and_run(inbox)
    assert statuses() == {Status.DONE: len(written)}
    # clean-up has not run yet: the originals are still in place, and one is sent again elsewhere
    for path, data in blobs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    Image.objects.update(cleaned_at=None)
    resent = inbox / "resent" / "IM.dcm"
    resent.parent.mkdir()
    resent.write_bytes(blobs[written[0]])
    report = ingest_folder(inbox)
    assert (report.images, report.reprocessed, report.skipped, report.quarantined, report.rejected) == (0, 0, 0, 0, 0)
    assert ReceivedFile.objects.count() == 0 and statuses() == {Status.DONE: len(written)}
    assert resent.exists()  # left alone until clean-up has run
    for path in written:  # clean-up runs
        path.unlink()
    Image.objects.update(cleaned_at=timezone.now())
    report = ingest_folder(inbox)
    assert report.reprocessed == 1  # now it is a re-send after DONE: processed again
    image = Image.objects.get(path="resent/IM.dcm")
    assert image.status == Status.NEW and image.cleaned_at is None


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


def test_readmission_changes_nothing_when_another_writer_moved_the_image_first(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    written = demo_into(inbox, patients=1, images=1)
    blob = written[0].read_bytes()
    ingest_and_run(inbox)
    target = Image.objects.get(path=str(written[0].relative_to(inbox)))
    assert target.status == Status.DONE and target.cleaned_at is not None
    copy = inbox / "a" / "IM.dcm"
    copy.parent.mkdir()
    copy.write_bytes(blob)
    real_hash = files.sha256_of

    def racing(path: Path) -> str:
        # a concurrent scan re-admits the image from another copy just before this scan does
        Image.objects.filter(pk=target.pk).update(status=Status.NEW, path="b/IM.dcm", cleaned_at=None)
        return real_hash(path)

    monkeypatch.setattr(files, "sha256_of", racing)
    report = ingest_folder(inbox)
    assert report.reprocessed == 0
    image = Image.objects.get(pk=target.pk)
    assert (image.status, image.path) == (Status.NEW, "b/IM.dcm")  # the other writer's change stands
    assert not Event.objects.filter(image=image, reason__startswith="arrived again").exists()
    assert copy.exists() and ReceivedFile.objects.count() == 0  # left for the next scan


def test_a_file_that_vanishes_before_it_is_read_is_not_a_rejected_file(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    written = ten_valid(inbox)
    doomed = written[3].resolve()
    real_read = ingest_module.read_header

    def vanishing(path: Path) -> Any:
        if Path(path).resolve() == doomed:
            doomed.unlink()  # the producer took it back between the listing and the read
        return real_read(path)

    monkeypatch.setattr(ingest_module, "read_header", vanishing)
    report = ingest_folder(inbox)
    assert report.images == 9
    assert ReceivedFile.objects.count() == 0 and report.problems == []


def test_a_duplicate_that_vanishes_before_it_is_hashed_is_not_recorded(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    written = demo_into(inbox, patients=1, images=1)
    ingest_folder(inbox)  # in flight now
    copy = inbox / "again" / "IM.dcm"
    copy.parent.mkdir()
    shutil.copy(written[0], copy)
    real_hash = files.sha256_of

    def vanishing(path: Path) -> str:
        if Path(path).name == "IM.dcm" and "again" in Path(path).parts:
            Path(path).unlink()
        return real_hash(path)

    monkeypatch.setattr(files, "sha256_of", vanishing)
    report = ingest_folder(inbox)
    assert (report.skipped, report.quarantined, report.rejected) == (0, 0, 0)
    assert ReceivedFile.objects.count() == 0


def test_in_progress_and_hidden_entries_are_left_alone_by_rule_and_counted(sendit_dirs: dict[str, Path]) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    ten_valid(inbox)
    extra = spare(sendit_dirs, images=2)
    (inbox / "ST-9.tmp4711").mkdir()  # the producer's folder in progress
    shutil.copy(extra[0], inbox / "ST-9.tmp4711" / "IM1.dcm")
    shutil.copy(extra[1], inbox / "IM2.dcm.TMP")  # in progress, whatever the case
    (inbox / "x.tmpl").write_text("NAME.tmpXXXX with XXXX = l: in progress by the rule")
    (inbox / ".DS_Store").write_text("hidden")
    (inbox / ".partial").mkdir()
    (inbox / ".partial" / "IM3.dcm").write_text("inside a hidden folder")
    shutil.copy(extra[2], inbox / "scan.tmp.dcm")  # `.tmp` not last: a complete file
    report = ingest_folder(inbox)
    assert report.images == 11 and Image.objects.filter(path="scan.tmp.dcm").exists()
    assert dict(report.ignored) == {"in_progress": 3, "hidden": 2}
    assert ReceivedFile.objects.count() == 0
    assert (inbox / "ST-9.tmp4711" / "IM1.dcm").exists() and (inbox / "IM2.dcm.TMP").exists()


def test_paths_too_long_are_rejected_visibly_once(sendit_dirs: dict[str, Path]) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    ten_valid(inbox)
    data = spare(sendit_dirs)[0].read_bytes()
    folder = os.open(inbox, os.O_RDONLY)
    for _ in range(22):  # deeper than the kernel's 4,095 bytes: made through folder descriptors
        os.mkdir("d" * 200, dir_fd=folder)
        deeper = os.open("d" * 200, os.O_RDONLY, dir_fd=folder)
        os.close(folder)
        folder = deeper
    leaf = os.open("IM1.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=folder)
    os.write(leaf, data)
    os.close(leaf)
    os.close(folder)
    for _ in range(2):
        assert ingest_folder(inbox).images in (10, 0)
    assert Image.objects.count() == 10
    row = ReceivedFile.objects.get()
    assert row.reason.startswith("path too long") and len(row.path) <= 1024 and row.path.startswith("d" * 200)
    assert row.stored_at and os.path.lexists(row.stored_at)  # the too-long folder went to quarantine whole
    assert not (inbox / ("d" * 200)).exists()


@pytest.mark.parametrize("chunk", [500, 1])
def test_copies_in_one_scan_are_decided_by_path_order_and_name_the_image(
    sendit_dirs: dict[str, Path], chunk: int
) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    source = spare(sendit_dirs)[0]
    changed = pydicom.dcmread(source)
    changed.SeriesDescription = "changed content"
    (inbox / "a").mkdir()
    changed.save_as(inbox / "a" / "IM.dcm")
    shutil.copy(source, inbox / "b.dcm")
    (inbox / "c").mkdir()
    shutil.copy(source, inbox / "c" / "IM.dcm")
    ingest_paths(complete_files(inbox), chunk=chunk)
    image = Image.objects.get()
    assert image.path == "a/IM.dcm"  # sorts first (a/ before b.dcm), whatever the walk or the chunks
    received = {row.path: row for row in ReceivedFile.objects.all()}
    assert set(received) == {"b.dcm", "c/IM.dcm"}
    for row in received.values():
        assert row.status == Status.QUARANTINED and row.reason.startswith("conflict")
        assert row.image_id == image.pk and f"image #{image.pk}" in row.reason


def test_log_lines_mask_folder_names_that_look_like_patient_names(
    sendit_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    inbox = sendit_dirs["INPUT_FOLDER"]
    folder = inbox / "DOE^JOHN" / "Smith, Anna" / "CT"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.DEBUG):
        ingest_folder(inbox)
    row = ReceivedFile.objects.get()
    assert row.path == "DOE^JOHN/Smith, Anna/CT/notes.txt"  # the record keeps it (behind a login)
    assert "DOE" not in caplog.text and "Smith" not in caplog.text
    assert f"received file #{row.pk} (***/***/CT/notes.txt)" in caplog.text


def test_every_scan_is_recorded_and_a_failed_one_is_visible(
    sendit_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sendit.relay.watcher import Watcher

    inbox = sendit_dirs["INPUT_FOLDER"]
    ten_valid(inbox)
    (inbox / ".DS_Store").write_text("hidden")
    watcher = Watcher(inbox, rescan_seconds=60, on_ingest=lambda report: None)  # not started: scans by hand

    def state() -> ScanState:
        return ScanState.objects.get(name=socket.gethostname())

    assert watcher.scan().images == 10
    first = state()
    assert (first.ok, first.failures, first.error, first.ignored) == (True, 0, "", {"hidden": 1})
    assert first.started is not None and first.finished is not None and first.started <= first.finished
    away = inbox.rename(sendit_dirs["DATA_DIR"] / "away")  # the input folder is gone
    for failures in (1, 2):
        with pytest.raises(OSError):
            watcher.scan()
        assert (state().ok, state().failures) == (False, failures)
        assert state().error == "the input folder cannot be read (FileNotFoundError)"
    away.rename(inbox)
    watcher.scan()
    assert (state().ok, state().failures) == (True, 0)

    def database_down() -> dict[str, tuple[int, str]]:
        raise OperationalError("connection to server failed: PatientName=DOE^JOHN")

    monkeypatch.setattr(ingest_module, "known_paths", database_down)
    with pytest.raises(OperationalError):
        watcher.scan()
    assert (state().ok, state().failures) == (False, 1)
    assert state().error == "scan of the input folder failed (OperationalError)"


def test_recording_a_scan_never_raises_when_the_database_is_down(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sendit.relay.watcher import record_scan

    def down(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(ScanState.objects, "update_or_create", down)
    monkeypatch.setattr(ScanState.objects, "filter", down)
    record_scan(timezone.now(), ok=True)
    record_scan(timezone.now(), ok=False, error="scan of the input folder failed (OperationalError)")
    assert caplog.text.count("could not record the scan's state (OperationalError)") == 2

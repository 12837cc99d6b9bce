"""Instances received over DICOM (sendit.relay.received): kept, recorded, held until idle, recovered.

These call the steps the listener runs, with the test database; tests/test_listener.py drives the
same through a real `sendit run` and real senders.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from sendit.config import ConfigError, load_config
from sendit.relay import received
from sendit.relay.callers import Caller, parse_callers
from sendit.relay.models import Image, Series, Status
from sendit.relay.tasks import stale_series
from tests.orthanc import write_ct

pytestmark = pytest.mark.django_db


def arrive(folder: Path, series_uid: str) -> Path:
    """An instance as the listener keeps it: through make_durable, from the bytes a sender sent."""
    source = write_ct(folder / f"{generate_uid()}.dcm", series_uid=series_uid)
    return received.make_durable(source.read_bytes())


def test_a_kept_instance_is_recorded_like_a_file_of_the_folder(sendit_dirs: dict[str, Path], tmp_path: Path) -> None:
    series_uid = generate_uid()
    path = arrive(tmp_path, series_uid)
    assert path.parent == sendit_dirs["INPUT_FOLDER"] / ".sendit-received" / socket.gethostname()
    assert not any(name.endswith(".part") for name in os.listdir(path.parent))
    report = received.record(path)
    image = Image.objects.get()
    assert report.images == 1 and image.status == Status.NEW
    # relative to the input folder, a random name in this host's folder
    assert image.path == f".sendit-received/{socket.gethostname()}/{path.name}"
    assert image.series.series_uid == series_uid


def test_a_held_series_is_not_requeued_before_it_is_idle(sendit_dirs: dict[str, Path], tmp_path: Path) -> None:
    report = received.record(arrive(tmp_path, generate_uid()))
    series_id = next(iter(report.series_ids))
    assert series_id in stale_series()  # recorded, no task: the requeue would take it at once
    received.hold_series({series_id}, 60)
    assert series_id not in stale_series()  # held: more may arrive
    received.hold_series({series_id}, -1)  # the idle time has passed (the listener is gone)
    assert series_id in stale_series()


def test_recover_removes_partial_files_and_records_complete_ones(sendit_dirs: dict[str, Path], tmp_path: Path) -> None:
    complete = arrive(tmp_path, generate_uid())  # kept, then the process died before recording it
    partial = complete.parent / ".0123456789abcdef.part"
    partial.write_bytes(complete.read_bytes()[:1000])
    report = received.recover()
    assert not partial.exists()
    assert report.images == 1
    assert Image.objects.get().path == f".sendit-received/{socket.gethostname()}/{complete.name}"
    assert received.recover().images == 0  # recorded once


def test_recover_leaves_another_hosts_files_alone(sendit_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A shared input folder (many hosts): what another host's listener is writing is its own."""
    other = sendit_dirs["INPUT_FOLDER"] / ".sendit-received" / "another-host"
    other.mkdir(parents=True)
    partial = other / ".0123456789abcdef.part"
    partial.write_bytes(b"half an instance")
    complete = other / "fedcba9876543210.dcm"
    complete.write_bytes(write_ct(tmp_path / "c.dcm", series_uid=generate_uid()).read_bytes())
    assert received.recover().images == 0
    assert partial.exists() and complete.exists() and not Image.objects.exists()


def test_a_duplicate_arrival_is_skipped_and_moved_out(sendit_dirs: dict[str, Path], tmp_path: Path) -> None:
    source = write_ct(tmp_path / "a.dcm", series_uid=generate_uid())
    received.record(received.make_durable(source.read_bytes()))
    again = received.make_durable(source.read_bytes())
    report = received.record(again)
    assert report.skipped == 1 and not again.exists()
    assert Series.objects.count() == 1 and Image.objects.count() == 1


def test_keep_records_an_instance_as_record_does(sendit_dirs: dict[str, Path], tmp_path: Path) -> None:
    """The listener's path (rows written while the file is fsynced) records what the folder's would."""
    series_uid = generate_uid()
    report = received.keep(write_ct(tmp_path / "a.dcm", series_uid=series_uid).read_bytes())
    image = Image.objects.get()
    assert report.images == 1 and report.series_ids == {image.series_id} and image.status == Status.NEW
    assert image.series.series_uid == series_uid and image.series.status == Status.NEW
    kept = sendit_dirs["INPUT_FOLDER"] / image.path
    assert kept.is_file() and image.size == kept.stat().st_size
    assert image.events.filter(to_status=Status.NEW, reason="ingested").count() == 1
    assert not any(name.endswith(".part") for name in os.listdir(kept.parent))
    again = received.keep(kept.read_bytes())  # the sender sends it again: a duplicate, as for the folder
    assert again.skipped == 1 and Image.objects.count() == 1


def test_an_instance_that_cannot_be_made_durable_is_not_recorded(
    sendit_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows are written before the fsync ends, but committed only after: a failed fsync (disk
    full) leaves no row and no file, and keep raises, so the listener answers 0xA700."""
    data = write_ct(tmp_path / "a.dcm", series_uid=generate_uid()).read_bytes()

    def no_space(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(received.os, "fsync", no_space)
    with pytest.raises(OSError):
        received.keep(data)
    assert not Image.objects.exists() and not Series.objects.exists()
    assert os.listdir(received.received_folder()) == []
    monkeypatch.undo()
    assert received.keep(data).images == 1  # the sender's retry is kept


def test_a_crash_between_fsync_and_commit_loses_nothing(
    sendit_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the file was durable, before its rows were committed: never answered Success, so
    the sender sends it again; the next start records the file, and the two become one image."""
    data = write_ct(tmp_path / "a.dcm", series_uid=generate_uid()).read_bytes()
    real = received.ingest_new_file

    def killed(entry, data, read_from, before_commit):  # type: ignore[no-untyped-def]
        before_commit()
        raise SystemExit("killed before the commit")

    monkeypatch.setattr(received, "ingest_new_file", killed)
    with pytest.raises(SystemExit):
        received.keep(data)
    assert not Image.objects.exists()
    left = [name for name in os.listdir(received.received_folder())]
    assert len(left) == 1 and left[0].endswith(".dcm")  # durable, unrecorded
    monkeypatch.setattr(received, "ingest_new_file", real)
    assert received.recover().images == 1  # the next start
    assert received.keep(data).skipped == 1  # the sender's retry
    assert Image.objects.count() == 1


def test_allowed_callers_are_parsed_and_checked(tmp_path: Path) -> None:
    assert parse_callers(" CT1, PACS@10.0.0.5 ,,") == [Caller("CT1"), Caller("PACS", "10.0.0.5")]
    with pytest.raises(ValueError, match="not an AE title"):
        parse_callers("THIS-AE-TITLE-IS-TOO-LONG")
    env = {"SENDIT_SECRET_KEY": "k" * 40, "SENDIT_DATA_DIR": str(tmp_path), "SENDIT_LISTEN_PORT": "11112"}
    with pytest.raises(ConfigError, match="ALLOWED_CALLERS: LISTEN_PORT is set but no caller is allowed"):
        load_config(None, env=env)
    assert load_config(None, env={**env, "SENDIT_ALLOWED_CALLERS": "CT1"}).LISTEN_PORT == 11112


def test_check_says_when_the_listener_port_is_taken(tmp_path: Path) -> None:
    import socket

    from sendit.checks import listen_port_finding

    env = {"SENDIT_SECRET_KEY": "k" * 40, "SENDIT_DATA_DIR": str(tmp_path), "SENDIT_ALLOWED_CALLERS": "CT1"}
    assert listen_port_finding(load_config(None, env=env)) is None  # no listener configured
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        finding = listen_port_finding(load_config(None, env={**env, "SENDIT_LISTEN_PORT": str(port)}))
        assert finding is not None and not finding.ok
        assert finding.line.startswith(f"LISTEN_PORT: cannot listen on 127.0.0.1:{port}")
    finding = listen_port_finding(load_config(None, env={**env, "SENDIT_LISTEN_PORT": str(port)}))
    assert finding is not None and finding.ok


def test_an_instance_answered_success_whose_row_was_lost_is_recorded_again_at_the_next_start(
    sendit_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """On PostgreSQL the listener's commit does not wait for its WAL flush (the file is durable
    first): a crash of the database can lose the rows of instances already answered Success. The
    durable file is all it takes: the next start records the instance again, in its series."""
    series_uid = generate_uid()
    report = received.keep(write_ct(tmp_path / "a.dcm", series_uid=series_uid).read_bytes())
    assert report.images == 1  # the listener would answer Success now
    kept = Image.objects.get().path
    Series.objects.all().delete()  # the database comes back without the last rows (images, events too)
    assert not Image.objects.exists()
    again = received.recover()  # the next start
    image = Image.objects.get()
    assert again.images == 1 and again.series_ids == {image.series_id}
    assert image.path == kept and image.status == Status.NEW and image.series.series_uid == series_uid


@pytest.mark.skipif(not os.environ.get("DATABASE_URL", "").startswith("postgres"), reason="PostgreSQL only")
def test_a_restart_of_postgresql_under_a_running_listener_records_lost_rows_again(
    sendit_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Without a restart of Sendit: PostgreSQL restarting ends every connection, the watch's too; the
    first look after it records again what the database lost."""
    from django.db import connection

    watch = received.DatabaseWatch()
    assert watch.check() is None  # connected; nothing lost
    received.keep(write_ct(tmp_path / "a.dcm", series_uid=generate_uid()).read_bytes())
    Series.objects.all().delete()  # lost with the crash
    with connection.cursor() as cursor:  # the crash: PostgreSQL ends the watch's connection
        cursor.execute("SELECT pg_terminate_backend(%s)", [watch._own.info.backend_pid])
    try:
        assert watch.check() is None and watch.lost  # noticed; nothing to do until it is back
        report = watch.check()  # it is back
        assert report is not None and report.images == 1 and not watch.lost
        assert Image.objects.get().status == Status.NEW
        assert watch.check() is None  # once
    finally:
        watch.close()


def test_a_recovery_waits_for_instances_being_kept() -> None:
    """A recovery while the listener receives must not record a file whose keep is between its
    rename and its commit: it waits until no keep is in progress."""
    gate = received._Gate()
    order: list[str] = []

    def recover() -> None:
        with gate.exclusive():
            order.append("recovered")

    recovering = threading.Thread(target=recover)
    with gate.shared():
        recovering.start()
        recovering.join(timeout=0.5)
        order.append("kept")
    recovering.join(timeout=10)
    assert order == ["kept", "recovered"]


def test_keep_adds_to_a_known_series_as_record_does(sendit_dirs: dict[str, Path], tmp_path: Path) -> None:
    """An instance of a series recorded earlier joins it (on PostgreSQL in one statement); into a
    series that is not NEW any more, the series' status is worked out again, as the folder's path does."""
    series_uid = generate_uid()
    first = received.keep(write_ct(tmp_path / "a.dcm", series_uid=series_uid).read_bytes())
    second = received.keep(write_ct(tmp_path / "b.dcm", series_uid=series_uid).read_bytes())
    series = Series.objects.get()
    assert first.series_ids == second.series_ids == {series.pk} and series.images.count() == 2
    assert all(image.created and image.updated and image.status == Status.NEW for image in series.images.all())
    Image.objects.update(status=Status.DONE)
    Series.objects.update(status=Status.DONE)
    by_keep = received.keep(write_ct(tmp_path / "c.dcm", series_uid=series_uid).read_bytes())
    status_by_keep = Series.objects.get().status
    Image.objects.filter(status=Status.NEW).delete()
    Series.objects.update(status=Status.DONE)
    by_record = received.record(arrive(tmp_path, series_uid))
    assert by_keep.images == by_record.images == 1
    assert status_by_keep == Series.objects.get().status != Status.DONE

"""Fencing: a worker that lost its lease (paused, cut off) changes nothing; no state goes backwards.

Each test reproduces a defect seen under a paused worker or a kill storm (issue 9, items 2, 3 and 5).
"""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from sendit.relay import pipeline
from sendit.relay.ingest import ingest_folder
from sendit.relay.inline import run_inline
from sendit.relay.models import Event, Image, Series, Status
from sendit.relay.transitions import Lease, LeaseLost, move_images
from tests.helpers import demo_into

pytestmark = pytest.mark.django_db(transaction=True)


def _one_series(input_folder: Path, images: int = 3) -> int:
    demo_into(input_folder, patients=1, images=images)
    return sorted(ingest_folder(input_folder).series_ids)[0]


def statuses_of(series_id: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in Image.objects.filter(series_id=series_id).values_list("status", flat=True):
        counts[status] = counts.get(status, 0) + 1
    return counts


def _take_over(series_id: int) -> Lease:
    """What another worker does once the lease ran out: acquire it (the generation goes up)."""
    Series.objects.filter(pk=series_id).update(lease_expires=timezone.now() - timedelta(seconds=1))
    lease = pipeline.acquire_lease(series_id, "other-host:1:ns:x")
    assert lease is not None
    return lease


def test_a_worker_that_lost_its_lease_mid_batch_stops_at_once(sendit_dirs: dict[str, Path], monkeypatch: Any) -> None:
    """The takeover happens after the first image of a batch: the old worker writes no status after it."""
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=4)
    engine = pipeline.runtime.deidentifier()
    real = engine.deidentify_file
    calls: list[int] = []

    def paused_then_taken(source: Path, target: Path, ids: Any, **options: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            _take_over(series_id)  # while this worker "slept", another took the series
        return real(source, target, ids, **options)

    monkeypatch.setattr(engine, "deidentify_file", paused_then_taken)
    outcome = pipeline.process_series(series_id)
    assert outcome.busy and not outcome.finished
    assert len(calls) <= 2  # stopped at the next image, not after the batch
    series = Series.objects.get(pk=series_id)
    assert series.lease_owner == "other-host:1:ns:x"  # the other worker's lease stands
    assert not series.images.filter(status__in=(Status.DONEPROCESSING, Status.SENT, Status.DONE)).exists()
    assert not series.images.filter(status=Status.QUARANTINED).exists()


def test_a_stale_lease_cannot_move_finished_images(sendit_dirs: dict[str, Path]) -> None:
    """A paused worker wakes up after another finished the series: its writes change nothing."""
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"])
    stale = pipeline.acquire_lease(series_id, pipeline.lease_owner_name())
    assert stale is not None
    Series.objects.filter(pk=series_id).update(lease_expires=timezone.now() - timedelta(seconds=1))
    run_inline([series_id], workers=1)  # another worker takes over and finishes
    assert statuses_of(series_id) == {Status.DONE: 3}
    series = Series.objects.get(pk=series_id)
    ids = list(series.images.values_list("id", flat=True))
    with pytest.raises(LeaseLost):
        move_images(series, ids, Status.QUARANTINED, "stale", expect=(Status.PROCESSING,), lease=stale)
    # and without the lease check, the expected status alone keeps DONE where it is
    assert move_images(series, ids, Status.DONEPROCESSING, expect=(Status.PROCESSING, Status.SENT)) == 0
    assert statuses_of(series_id) == {Status.DONE: 3}
    assert not Event.objects.filter(from_status=Status.DONE).exists()


def test_each_acquisition_is_a_new_generation(sendit_dirs: dict[str, Path]) -> None:
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=1)
    first = pipeline.acquire_lease(series_id, pipeline.lease_owner_name())
    assert first is not None
    pipeline._HELD.add(first.owner)  # this process is working on it
    try:
        assert pipeline.acquire_lease(series_id, pipeline.lease_owner_name()) is None  # held: nobody else
    finally:
        pipeline._HELD.discard(first.owner)
    second = _take_over(series_id)
    assert second.generation == first.generation + 1
    assert not pipeline.renew_lease(first)  # the old holder cannot extend what it lost
    assert pipeline.renew_lease(second)
    pipeline.release_lease(first)  # releasing a lost lease leaves the new holder's alone
    assert Series.objects.get(pk=series_id).lease_owner == second.owner


def test_a_lease_left_by_this_process_after_a_failed_step_is_taken_back(sendit_dirs: dict[str, Path]) -> None:
    """The database went away before the release: the retry in seconds must not wait a lease period."""
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=1)
    left = pipeline.lease_owner_name()  # this process, but no longer working on it
    Series.objects.filter(pk=series_id).update(lease_owner=left, lease_expires=timezone.now() + timedelta(minutes=10))
    assert pipeline.process_series(series_id).finished
    assert statuses_of(series_id) == {Status.DONE: 1}


def test_same_host_name_in_another_pid_namespace_is_not_judged_dead(sendit_dirs: dict[str, Path]) -> None:
    """Containers with one host name: a PID of another namespace says nothing about the holder; its
    heartbeat does (tests/test_liveness.py)."""
    from django.db.models.functions import Now

    from sendit.relay.models import WorkerHeartbeat

    gone = subprocess.Popen(["true"])
    gone.wait()
    here = pipeline.lease_owner_name().split(":")
    elsewhere = f"{socket.gethostname()}:{gone.pid}:0000ffff"
    alive = f"{here[0]}:{os.getppid()}:{here[2]}"
    for name in (elsewhere, alive):  # both beat
        WorkerHeartbeat.objects.create(name=name, started=timezone.now(), seen=Now())
    assert not pipeline.holder_is_dead(f"{elsewhere}:abc")
    assert pipeline.holder_is_dead(f"{here[0]}:{gone.pid}:{here[2]}:abc")  # same namespace, exited: dead
    assert not pipeline.holder_is_dead(f"{alive}:abc")  # alive


def test_a_clean_up_cut_short_is_found_by_the_requeue(sendit_dirs: dict[str, Path], monkeypatch: Any) -> None:
    """A kill in the middle of clean-up left DONE images with originals in place; the requeue finishes it."""
    from sendit.relay import files
    from sendit.relay.tasks import stale_series

    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=3)
    real = files.remove_original
    removed: list[str] = []

    def killed_after_one(stored: str) -> None:
        if removed:
            raise KeyboardInterrupt  # the worker is killed here
        removed.append(stored)
        real(stored)

    monkeypatch.setattr(files, "remove_original", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        pipeline.process_series(series_id)
    monkeypatch.undo()
    assert statuses_of(series_id) == {Status.DONE: 3}
    # no image is marked cleaned while its original is still in the input folder (the marks of the
    # batch the kill cut short rolled back), so the requeue finds every one of them
    uncleaned = set(Image.objects.filter(series_id=series_id, cleaned_at__isnull=True).values_list("path", flat=True))
    paths = Image.objects.filter(series_id=series_id).values_list("path", flat=True)
    still_there = {p for p in paths if (sendit_dirs["INPUT_FOLDER"] / p).exists()}
    assert len(still_there) == 2 and still_there <= uncleaned
    Series.objects.filter(pk=series_id).update(enqueued_at=timezone.now() - timedelta(minutes=5))
    assert series_id in stale_series()
    run_inline(stale_series(), workers=1)
    assert not Image.objects.filter(series_id=series_id, cleaned_at__isnull=True).exists()
    left = {str(p.relative_to(sendit_dirs["INPUT_FOLDER"])) for p in sendit_dirs["INPUT_FOLDER"].rglob("*")}
    assert not left & set(Image.objects.filter(series_id=series_id).values_list("path", flat=True))


def test_a_series_whose_task_was_lost_is_requeued_within_a_minute(
    sendit_dirs: dict[str, Path], reconfigure: Any
) -> None:
    """A push that failed after enqueued_at was written: not leased, nothing queued, work waiting."""
    from sendit.relay.tasks import huey, stale_series

    reconfigure(LEASE_SECONDS=600)
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=1)
    huey.flush()
    Series.objects.filter(pk=series_id).update(enqueued_at=timezone.now() - timedelta(seconds=45))
    assert series_id in stale_series()
    from sendit.relay.tasks import run_series

    run_series(series_id)  # now a task is queued: the requeue leaves it to that task
    assert series_id not in stale_series()
    huey.flush()


def test_full_work_folder_is_retried_not_quarantined(sendit_dirs: dict[str, Path], monkeypatch: Any) -> None:
    """ENOSPC while writing a working copy: a retryable failure naming the folder, never QUARANTINED."""
    import errno

    from sendit.relay.housekeeping import retry_errors

    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=2)
    engine = pipeline.runtime.deidentifier()
    real = engine.deidentify_file

    def disk_full(source: Path, target: Path, ids: Any, **options: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(engine, "deidentify_file", disk_full)
    outcome = pipeline.process_series(series_id)
    assert outcome.retry_in is not None
    series = Series.objects.get(pk=series_id)
    assert "no space left on the work folder" in series.last_error
    assert not Image.objects.filter(series_id=series_id, status=Status.QUARANTINED).exists()
    run_inline([series_id], workers=1)  # gives up after its attempts: ERROR, which `sendit retry` takes
    assert statuses_of(series_id) == {Status.ERROR: 2}
    assert "no space left on the work folder" in Image.objects.filter(series_id=series_id).first().reason  # type: ignore[union-attr]
    monkeypatch.setattr(engine, "deidentify_file", real)
    run_inline(retry_errors(), workers=1)
    assert statuses_of(series_id) == {Status.DONE: 2}


def test_two_series_of_one_study_store_their_identifiers_at_once_without_deadlock(
    sendit_dirs: dict[str, Path], monkeypatch: Any
) -> None:
    """Two workers ask for one study's identifiers at the same moment and store both answers: on
    PostgreSQL opposite insert orders deadlocked ("unexpected error (OperationalError)")."""
    import threading

    from django.db import connections

    from sendit.relay import runtime

    demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=1)
    ingest_folder(sendit_dirs["INPUT_FOLDER"])
    study_series = {}
    for series in Series.objects.all():
        study_series.setdefault(series.study_id, []).append(series)
    first, second = next(group for group in study_series.values() if len(group) >= 2)[:2]
    provider = runtime.identifier_provider()
    real = provider.identify
    together = threading.Barrier(2, timeout=20)

    def at_the_same_moment(headers: Any) -> Any:
        answers = real(headers)
        together.wait()  # both answers arrive together; both store at once
        return answers

    monkeypatch.setattr(provider, "identify", at_the_same_moment)
    failures: list[BaseException] = []

    def store(series: Series) -> None:
        try:
            pipeline.ensure_identifiers(series)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            failures.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=store, args=(series,)) for series in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, [type(exc).__name__ for exc in failures]
    from sendit.relay.models import SeriesIdentifiers

    assert SeriesIdentifiers.objects.filter(series__in=[first, second]).count() == 2


def test_a_back_off_is_due_by_the_databases_clock_whatever_a_hosts_clock_says(
    sendit_dirs: dict[str, Path], reconfigure: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host whose clock runs two hours fast schedules a retry: it is due after the back-off by the
    database's clock, and the requeue on such a host does not take it early (before, the host wrote
    and compared its own time: due two hours late on the others, or at once on a fast one)."""
    from django.db.models.functions import Now

    from sendit.relay.tasks import huey, stale_series

    reconfigure(RETRY_BASE_SECONDS=30, LEASE_SECONDS=600)
    series_id = _one_series(sendit_dirs["INPUT_FOLDER"], images=1)
    real_now = timezone.now
    fast = lambda: real_now() + timedelta(hours=2)  # noqa: E731 - this host's clock
    monkeypatch.setattr(timezone, "now", fast)
    lease = pipeline.acquire_lease(series_id, pipeline.lease_owner_name())
    assert lease is not None
    pipeline._schedule_retry(Series.objects.get(pk=series_id), lease, "destination down")
    pipeline.release_lease(lease)
    due = Series.objects.values_list("next_attempt_at", flat=True).get(pk=series_id)
    assert real_now() + timedelta(seconds=20) < due < real_now() + timedelta(seconds=40)

    huey.flush()  # no task queued, queued long ago by the database's clock: only the back-off holds it
    Series.objects.filter(pk=series_id).update(enqueued_at=Now() - timedelta(minutes=30))
    assert series_id not in stale_series()  # on the fast host too
    monkeypatch.undo()
    Series.objects.filter(pk=series_id).update(next_attempt_at=Now() - timedelta(seconds=1))
    assert series_id in stale_series()

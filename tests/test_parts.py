"""A big series on every worker (issue 17, item 2): split into parts that any free worker
de-identifies and delivers, joined for verification and clean-up, with the fencing and resumability
of a series — kills, takeovers and images arriving while it is split.

Small series with a small PART_SIZE: what matters is the number of parts, not of images.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone

from sendit.destinations.dicom import DicomDestination
from sendit.relay import files, pipeline, runtime
from sendit.relay.ingest import ingest_folder
from sendit.relay.inline import _forget_inherited_connections, run_inline
from sendit.relay.models import Delivery, Event, Image, Series, SeriesPart, Stage, Status
from tests import chaos
from tests.helpers import wait_for
from tests.orthanc import OrthancServer
from tests.test_pipeline_orthanc import via_dicom

pytestmark = pytest.mark.django_db(transaction=True)

Reconfigure = Callable[..., None]
FINISHED = re.compile(r"part #(\d+) \(images #(\d+)–#(\d+)\) finished by worker (\S+)")


def _series(folder: Path, count: int) -> int:
    """One series of ``count`` tiny CT images in ``folder``, ingested; its id."""
    chaos.write_series(folder, count)
    [series_id] = ingest_folder(folder).series_ids
    return series_id


def _finished_parts(series_id: int) -> list[tuple[int, int, int, str]]:
    """(part, first image id, last image id, "host:pid") of every part's finishing event."""
    found = []
    for reason in Event.objects.filter(series_id=series_id, reason__startswith="part #").values_list(
        "reason", flat=True
    ):
        match = FINISHED.fullmatch(reason)
        assert match, reason
        found.append((int(match[1]), int(match[2]), int(match[3]), match[4]))
    return found


def _assert_done_once_at_orthanc(series_id: int, server: OrthancServer, images: int) -> None:
    rows = Image.objects.filter(series_id=series_id)
    assert Counter(rows.values_list("status", flat=True)) == {Status.DONE: images}
    uids = set(rows.values_list("deid_sop_instance_uid", flat=True))
    assert len(uids) == images
    deid_series_uid = Series.objects.get(pk=series_id).deid_series_uid
    assert set(server.instances_in_series(deid_series_uid)) == uids
    assert server.count_instances() == images  # each SOP Instance UID once, nothing else
    done = Counter(
        Event.objects.filter(series_id=series_id, to_status=Status.DONE, image__isnull=False).values_list(
            "image_id", flat=True
        )
    )
    assert set(done.values()) == {1} and len(done) == images  # every image went DONE exactly once
    confirmed = Counter(Delivery.objects.filter(image__series_id=series_id).values_list("image_id", "destination"))
    destinations = {name for _, name in confirmed}
    assert len(confirmed) == images * len(destinations) and set(confirmed.values()) == {1}  # one per destination
    assert not SeriesPart.objects.filter(series_id=series_id).exists()  # joined
    assert not files.series_folder(series_id).exists()  # cleaned up, no stale worker's file left


def test_a_big_series_is_delivered_by_two_workers_and_orthanc_holds_each_image_once(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, orthanc_factory: Callable[..., OrthancServer]
) -> None:
    server = orthanc_factory()
    via_dicom(reconfigure, server, PART_SIZE=30, BATCH_SIZE=10)
    series_id = _series(sendit_dirs["INPUT_FOLDER"] / "big", 120)
    run_inline([series_id], workers=2)
    _assert_done_once_at_orthanc(series_id, server, 120)
    parts = _finished_parts(series_id)
    ranges = sorted((first, last) for _, first, last, _ in parts)
    ids = sorted(Image.objects.filter(series_id=series_id).values_list("id", flat=True))
    assert len(ranges) == 4 and ranges[0][0] == ids[0] and ranges[-1][1] == ids[-1]
    assert all(ranges[n][1] < ranges[n + 1][0] for n in range(3))  # disjoint, in order
    workers = Counter(worker for *_, worker in parts)
    assert len(workers) == 2, f"one worker did every part: {workers}"
    assert f":{os.getpid()}" not in str(workers)  # both are the pool's processes, not this one
    assert Series.objects.get(pk=series_id).stage == Stage.VERIFIED


def _run_in_child(series_id: int) -> None:
    _forget_inherited_connections()
    try:
        pipeline.process_series(series_id)
    finally:
        os._exit(0)


def test_a_part_worker_killed_mid_batch_loses_nothing_and_duplicates_nothing(
    sendit_dirs: dict[str, Path],
    reconfigure: Reconfigure,
    orthanc_factory: Callable[..., OrthancServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL while a part's batch is at Orthanc but not yet recorded: the part is taken over at once
    (its holder's PID is gone), the batch sent again, and Orthanc still holds each image once."""
    server = orthanc_factory()
    via_dicom(reconfigure, server, PART_SIZE=40, BATCH_SIZE=10)
    series_id = _series(sendit_dirs["INPUT_FOLDER"] / "big", 80)
    planned = pipeline.process_series(series_id)
    assert planned.spread == 2 and Series.objects.get(pk=series_id).stage == Stage.SPLIT
    first = SeriesPart.objects.filter(series_id=series_id).order_by("id")[0]
    in_part = Image.objects.filter(series_id=series_id, id__gte=first.first_image_id, id__lte=first.last_image_id)
    real_send = DicomDestination.send

    def sent_then_slow(self: DicomDestination, items: Any) -> Any:
        results = real_send(self, items)
        time.sleep(0.4)  # stored at Orthanc, not yet recorded: where a kill costs the most
        return results

    monkeypatch.setattr(DicomDestination, "send", sent_then_slow)
    connections.close_all()
    child = multiprocessing.get_context("fork").Process(target=_run_in_child, args=(series_id,))
    child.start()
    try:
        mid_batch = wait_for(
            lambda: (
                in_part.filter(status=Status.SENT).count() >= 10
                and in_part.filter(status=Status.DONEPROCESSING).exists()
            ),
            60,
            every=0.02,
        )
        time.sleep(0.2)  # inside the next batch's window
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert mid_batch, "the part worker never reached its second batch"
    left = Counter(in_part.values_list("status", flat=True))
    assert left[Status.DONEPROCESSING] > 0 and left[Status.SENT] >= 10, left
    monkeypatch.setattr(DicomDestination, "send", real_send)
    assert not chaos.drive([series_id])
    _assert_done_once_at_orthanc(series_id, server, 80)
    parts = {part: worker for part, *_, worker in _finished_parts(series_id)}
    assert parts[first.pk].endswith(f":{os.getpid()}")  # the killed part was finished by its taker


def test_a_paused_part_worker_whose_part_was_taken_over_writes_nothing(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, monkeypatch: pytest.MonkeyPatch
) -> None:
    reconfigure(PART_SIZE=10, BATCH_SIZE=5)
    series_id = _series(sendit_dirs["INPUT_FOLDER"] / "big", 25)
    assert pipeline.process_series(series_id).spread == 3
    part = SeriesPart.objects.filter(series_id=series_id).order_by("id")[0]
    engine = runtime.deidentifier()
    real = engine.deidentify_file
    calls: list[int] = []

    def paused_then_taken(source: Path, target: Path, ids: Any, **options: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:  # while this worker "slept", its part's lease ran out and another took it
            SeriesPart.objects.filter(pk=part.pk).update(lease_expires=timezone.now() - timedelta(seconds=1))
            assert pipeline.acquire_part(part, "other-host:1:ns:x") is not None
        return real(source, target, ids, **options)

    monkeypatch.setattr(engine, "deidentify_file", paused_then_taken)
    outcome = pipeline.process_series(series_id)
    assert outcome.busy and not outcome.finished
    assert len(calls) <= 2  # stopped at the next image, not after the batch
    taken = SeriesPart.objects.get(pk=part.pk)
    assert taken.lease_owner == "other-host:1:ns:x" and taken.finished_at is None
    in_part = Image.objects.filter(series_id=series_id, id__gte=part.first_image_id, id__lte=part.last_image_id)
    assert set(in_part.values_list("status", flat=True)) <= {Status.NEW, Status.PROCESSING}
    assert not in_part.exclude(deid_sop_instance_uid="").exists()
    folder = files.series_folder(series_id)
    assert not [path.name for path in folder.iterdir()]  # no working copy, no file of the lost generation
    assert not any(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))
    assert not _finished_parts(series_id)


def test_a_series_that_receives_more_images_while_split_ends_all_done(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, tmp_path: Path
) -> None:
    reconfigure(PART_SIZE=20, BATCH_SIZE=10)
    staging = tmp_path / "staging" / "series"
    chaos.write_series(staging, 65)
    first, later = sendit_dirs["INPUT_FOLDER"] / "first", sendit_dirs["INPUT_FOLDER"] / "later"
    first.mkdir()
    later.mkdir()
    for n, path in enumerate(sorted(staging.iterdir())):
        shutil.move(path, (first if n < 50 else later) / path.name)
    [series_id] = ingest_folder(first).series_ids
    assert pipeline.process_series(series_id).spread == 3
    assert ingest_folder(later).series_ids == {series_id}  # the same series, while split
    newest = Image.objects.filter(series_id=series_id).order_by("-id")[0].pk
    assert SeriesPart.objects.filter(series_id=series_id, last_image_id__gte=newest).count() == 0
    run_inline([series_id], workers=2)
    assert Counter(Image.objects.filter(series_id=series_id).values_list("status", flat=True)) == {Status.DONE: 65}
    assert len(list(sendit_dirs["OUTPUT_FOLDER"].rglob("*.dcm"))) == 65
    assert len(_finished_parts(series_id)) == 3
    assert not SeriesPart.objects.exists()


def test_a_failed_part_leaves_its_images_to_the_series_run_which_counts_the_attempt(
    sendit_dirs: dict[str, Path], reconfigure: Reconfigure, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full work folder fails every part: the join takes their images on the series' own run,
    which counts one attempt and backs off — no new round of parts, nothing quarantined."""
    reconfigure(PART_SIZE=10, BATCH_SIZE=5, MAX_ATTEMPTS=5, RETRY_BASE_SECONDS=30)
    series_id = _series(sendit_dirs["INPUT_FOLDER"] / "big", 25)

    def disk_full(source: Path, target: Path, ids: Any, **options: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.deidentifier(), "deidentify_file", disk_full)
    runs = []
    for _ in range(10):
        runs.append(pipeline.process_series(series_id))
        if runs[-1].finished or (runs[-1].retry_in or 0) > 0:
            break
    assert (runs[-1].retry_in or 0) > 0, runs  # a back-off, after the plan, 3 parts and the join
    assert len(runs) == 5, runs
    series = Series.objects.get(pk=series_id)
    assert series.attempts == 1 and series.stage == Stage.RETRYING
    assert len(_finished_parts(series_id)) == 3 and not SeriesPart.objects.exists()
    assert set(Image.objects.filter(series_id=series_id).values_list("status", flat=True)) <= {
        Status.NEW,
        Status.PROCESSING,
    }

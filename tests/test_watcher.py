"""The watcher: nothing under a `.tmp` name is touched; after the rename it is ingested within 2 s."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from sendit.relay.ingest import IngestReport
from sendit.relay.models import Image
from sendit.relay.watcher import Watcher, _Poke
from tests.helpers import demo_into, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_renamed_folder_is_ingested_within_two_seconds_and_tmp_never(
    sendit_dirs: dict[str, Path], reconfigure: object
) -> None:
    reconfigure(STABLE_SECONDS=60)  # type: ignore[operator]  # the rename says complete: no settle time
    staging = sendit_dirs["DATA_DIR"] / "staging"
    written = demo_into(staging, patients=1, images=2)
    study = written[0].parents[1]
    reports: list[IngestReport] = []
    watcher = Watcher(sendit_dirs["INPUT_FOLDER"], rescan_seconds=60, on_ingest=reports.append)
    watcher.start()
    try:
        partial = sendit_dirs["INPUT_FOLDER"] / "ST-X.tmp4711"
        study.rename(partial)  # the producer fills a .tmp folder ...
        time.sleep(1.0)
        assert Image.objects.count() == 0
        assert all(path.exists() for path in partial.rglob("*.dcm"))  # untouched
        started = time.monotonic()
        partial.rename(sendit_dirs["INPUT_FOLDER"] / "ST-X")  # ... and renames it when complete
        assert wait_for(lambda: Image.objects.count() == len(written), 2.0)
        assert time.monotonic() - started < 2.0
        assert any(report.series_ids for report in reports)
    finally:
        watcher.stop()


def test_restarted_watcher_finds_what_arrived_while_it_was_down(sendit_dirs: dict[str, Path]) -> None:
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    reports: list[IngestReport] = []
    watcher = Watcher(sendit_dirs["INPUT_FOLDER"], rescan_seconds=60, on_ingest=reports.append)
    watcher.start()
    try:
        assert wait_for(lambda: Image.objects.count() == len(written), 5.0)
    finally:
        watcher.stop()
    second = Watcher(sendit_dirs["INPUT_FOLDER"], rescan_seconds=60, on_ingest=reports.append)
    second.start()
    try:
        time.sleep(0.5)
        assert Image.objects.count() == len(written)  # nothing ingested twice
    finally:
        second.stop()


def test_a_scan_hands_on_each_series_while_it_still_reads_the_rest(sendit_dirs: dict[str, Path]) -> None:
    """Issue 17: the workers need not wait for a big drop's whole scan. Series are handed on (queued)
    chunk by chunk once the walk has left them, the first before the last file is recorded, and
    each series once."""
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=3, images=60)
    handed: list[tuple[set[int], int]] = []

    def on_ingest(report: IngestReport) -> None:
        handed.append((set(report.series_ids), Image.objects.count()))

    report = Watcher(sendit_dirs["INPUT_FOLDER"], rescan_seconds=60, on_ingest=on_ingest).scan()
    assert report.images == len(written)
    assert handed[0][1] < len(written)
    every = [series_id for ids, _ in handed for series_id in ids]
    assert sorted(every) == sorted(report.series_ids)


def test_what_happens_below_a_hidden_folder_does_not_wake_a_scan(sendit_dirs: dict[str, Path]) -> None:
    """The listener writes each received instance below `.sendit-received`: the scan never reads
    there, so writing it must not start a scan of the whole input folder; a hidden name renamed into
    view still does (an atomic arrival)."""
    from watchdog.events import FileClosedEvent, FileCreatedEvent, FileMovedEvent

    root = sendit_dirs["INPUT_FOLDER"]
    watcher = Watcher(root, rescan_seconds=60, on_ingest=lambda report: None)
    poke = _Poke(threading.Event(), watcher._moved, watcher._unseen)
    received = root / ".sendit-received" / "host"
    for event in (
        FileCreatedEvent(str(received / ".abc.part")),
        FileClosedEvent(str(received / ".abc.part")),
        FileMovedEvent(str(received / ".abc.part"), str(received / "abc.dcm")),
        FileCreatedEvent(str(root / "study" / ".IM1.dcm.swp")),
    ):
        poke.on_any_event(event)
    assert not poke.wake.is_set()
    poke.on_any_event(FileMovedEvent(str(root / ".IM1.dcm"), str(root / "IM1.dcm")))
    assert poke.wake.is_set()
    poke.wake.clear()
    poke.on_any_event(FileClosedEvent(str(root / "study" / "IM2.dcm")))
    assert poke.wake.is_set()

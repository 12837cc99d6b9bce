"""Producers that write in place (docs/operations.md, Settle time): a file is taken only once nothing
in its folder changed for STABLE_SECONDS; a `.tmp` rename, or a move in from elsewhere, is taken at
once; a folder a producer may still be writing to is never removed.

"Time passes" is set with os.utime (a minute ago) rather than waited for, except where the watcher's
own clock is the point.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sendit.relay.ingest import SETTLING, complete_files, ingest_paths
from sendit.relay.inline import run_inline
from sendit.relay.models import Image, ReceivedFile, ScanState, Series, Status
from sendit.relay.watcher import Watcher
from tests.helpers import demo_into, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def valid_files(sendit_dirs: dict[str, Path], images: int = 1) -> list[bytes]:
    """The bytes of valid DICOM files, made outside the input folder."""
    written = demo_into(sendit_dirs["DATA_DIR"] / f"made-{images}", patients=1, images=images)
    return [path.read_bytes() for path in written[:images]]


def age(*paths: Path, seconds: float = 60) -> None:
    """As if the producer last touched these a minute ago."""
    past = time.time() - seconds
    for path in paths:
        os.utime(path, (past, past))


def by_hand(root: Path) -> Watcher:
    return Watcher(root, rescan_seconds=60, on_ingest=lambda report: None)  # not started: scans by hand


def done_in_place(series_ids: set[int] | None = None) -> list[str]:
    run_inline(series_ids if series_ids is not None else set(Series.objects.values_list("id", flat=True)), workers=1)
    return list(Image.objects.values_list("status", flat=True))


def test_a_half_written_file_waits_for_the_rest_and_then_goes_through(
    sendit_dirs: dict[str, Path], reconfigure: object
) -> None:
    reconfigure(STABLE_SECONDS=5)  # type: ignore[operator]
    (data,) = valid_files(sendit_dirs)
    root = sendit_dirs["INPUT_FOLDER"]
    folder = root / "ST-1" / "SE-1"
    folder.mkdir(parents=True)
    target = folder / "IM1.dcm"
    target.write_bytes(data[: len(data) // 2])  # the producer pauses here
    watcher = by_hand(root)

    report = watcher.scan()
    assert report.ignored[SETTLING] == 1  # counted, so the dashboard shows a producer at work
    assert (Image.objects.count(), ReceivedFile.objects.count()) == (0, 0)  # not recorded, not quarantined
    assert not any(sendit_dirs["QUARANTINE_FOLDER"].rglob("*"))
    with open(target, "ab") as handle:  # the producer's next write: file and folder are still there
        handle.write(data[len(data) // 2 :])
    assert watcher.scan().images == 0  # just written: still settling

    age(target, folder)
    report = watcher.scan()
    assert (report.images, report.problems) == (1, [])
    assert done_in_place(report.series_ids) == [Status.DONE]
    assert ReceivedFile.objects.count() == 0


def test_the_folder_waits_for_its_slowest_file(sendit_dirs: dict[str, Path], reconfigure: object) -> None:
    """Nothing in its folder changed for STABLE_SECONDS: a finished file waits while its sibling is written."""
    reconfigure(STABLE_SECONDS=5)  # type: ignore[operator]
    first, second = valid_files(sendit_dirs, images=2)
    folder = sendit_dirs["INPUT_FOLDER"] / "ST-1"
    folder.mkdir()
    (folder / "IM1.dcm").write_bytes(first)
    (folder / "IM2.dcm").write_bytes(second[:100])
    age(folder / "IM1.dcm", folder)
    watcher = by_hand(sendit_dirs["INPUT_FOLDER"])
    assert watcher.scan().ignored[SETTLING] == 2
    with open(folder / "IM2.dcm", "ab") as handle:
        handle.write(second[100:])
    age(folder / "IM1.dcm", folder / "IM2.dcm", folder)
    assert watcher.scan().images == 2


def test_a_folder_the_producer_may_still_write_to_is_not_removed(
    sendit_dirs: dict[str, Path], reconfigure: object
) -> None:
    """A producer renames each file from `.tmp` into its study folder (taken at once); after the first
    image is DONE and cleaned up the folder stays, so the producer's next file lands; once nothing has
    changed in it for STABLE_SECONDS, a scan removes the emptied folder."""
    reconfigure(STABLE_SECONDS=30)  # type: ignore[operator]
    first, second = valid_files(sendit_dirs, images=2)
    root = sendit_dirs["INPUT_FOLDER"]
    folder = root / "ST-2"
    folder.mkdir()
    watcher = Watcher(root, rescan_seconds=60, on_ingest=lambda report: None)
    watcher.start()
    try:
        (folder / "IM1.dcm.tmp").write_bytes(first)
        (folder / "IM1.dcm.tmp").rename(folder / "IM1.dcm")
        assert wait_for(lambda: Image.objects.count() == 1, 10.0)
    finally:
        watcher.stop()
    assert done_in_place() == [Status.DONE]
    assert not (folder / "IM1.dcm").exists()  # cleaned up ...
    assert folder.is_dir()  # ... but the folder changed a moment ago: kept
    (folder / "IM2.dcm.tmp").write_bytes(second)  # the producer's next file lands
    (folder / "IM2.dcm.tmp").unlink()  # (and it gives up)

    watcher.scan()
    assert folder.is_dir()  # empty, but changed within STABLE_SECONDS
    age(folder)
    watcher.scan()
    assert not folder.exists()  # emptied by us and settled: tidied away
    assert root.is_dir()


def test_an_empty_folder_sendit_never_took_a_file_from_is_left_alone(
    sendit_dirs: dict[str, Path], reconfigure: object
) -> None:
    reconfigure(STABLE_SECONDS=5)  # type: ignore[operator]
    drop = sendit_dirs["INPUT_FOLDER"] / "ct-scanner"  # made by the operator for a producer
    drop.mkdir()
    (drop / "test.dcm").write_bytes(b"a file the operator takes back before it settles")
    watcher = by_hand(sendit_dirs["INPUT_FOLDER"])
    assert watcher.scan().ignored[SETTLING] == 1
    (drop / "test.dcm").unlink()
    age(drop)
    watcher.scan()
    watcher.scan()
    assert drop.is_dir()
    assert ReceivedFile.objects.count() == 0


def test_a_folder_moved_in_from_elsewhere_is_taken_at_once(sendit_dirs: dict[str, Path], reconfigure: object) -> None:
    """A rename into the input folder (from outside it, on the same file system) is atomic: complete."""
    reconfigure(STABLE_SECONDS=60)  # type: ignore[operator]
    written = demo_into(sendit_dirs["DATA_DIR"] / "staging", patients=1, images=2)
    study = written[0].parents[1]
    watcher = Watcher(sendit_dirs["INPUT_FOLDER"], rescan_seconds=60, on_ingest=lambda report: None)
    watcher.start()
    try:
        study.rename(sendit_dirs["INPUT_FOLDER"] / "ST-moved")
        assert wait_for(lambda: Image.objects.count() == len(written), 10.0)
    finally:
        watcher.stop()


def test_the_watcher_comes_back_when_the_settle_time_has_passed(
    sendit_dirs: dict[str, Path], reconfigure: object
) -> None:
    """No event follows the producer's last write: the watcher itself scans again after STABLE_SECONDS
    (not after RESCAN_SECONDS, here a minute)."""
    reconfigure(STABLE_SECONDS=4)  # type: ignore[operator]
    (data,) = valid_files(sendit_dirs)
    folder = sendit_dirs["INPUT_FOLDER"] / "ST-3"
    folder.mkdir()
    watcher = Watcher(sendit_dirs["INPUT_FOLDER"], rescan_seconds=60, on_ingest=lambda report: None)
    watcher.start()
    try:
        with open(folder / "IM1.dcm", "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            # the producer pauses, its file open: a scan sees the half and leaves it
            assert wait_for(lambda: ScanState.objects.filter(ignored__settling=1).exists(), 10.0)
            handle.write(data[len(data) // 2 :])
        assert wait_for(lambda: Image.objects.count() == 1, 20.0)
    finally:
        watcher.stop()
    assert ReceivedFile.objects.count() == 0
    assert done_in_place() == [Status.DONE]


def test_sendit_import_takes_what_it_is_given_at_once(sendit_dirs: dict[str, Path], reconfigure: object) -> None:
    """An explicit `sendit import` is the operator saying the files are complete."""
    reconfigure(STABLE_SECONDS=60)  # type: ignore[operator]
    written = demo_into(sendit_dirs["INPUT_FOLDER"], patients=1, images=2)
    assert ingest_paths(complete_files(sendit_dirs["INPUT_FOLDER"])).images == len(written)

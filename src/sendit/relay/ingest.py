"""Ingest: complete files in → Study / Series / Image rows (status NEW), in bulk, by SeriesInstanceUID.

Headers only are read. Every file ends recorded: as an Image, or as a ReceivedFile that says why it
was rejected (moved to quarantine), skipped as a duplicate, or quarantined as a conflict.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from django.db import transaction

from sendit.dicomio import FileHeader, RejectedFile, read_header
from sendit.relay import files
from sendit.relay.models import IN_FLIGHT, Event, Image, ReceivedFile, Series, Status, Study
from sendit.relay.transitions import clip, refresh_series_status

log = logging.getLogger("sendit.ingest")


def in_progress(name: str) -> bool:
    """The producer's convention: any name with a `.tmp` part is still being written."""
    return ".tmp" in name


def complete_files(root: Path) -> Iterator[Path]:
    """Files under ``root`` whose path holds no `.tmp` part, in a stable order; hidden files ignored."""
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not in_progress(d) and not d.startswith("."))
        for name in sorted(filenames):
            if not in_progress(name) and not name.startswith("."):
                yield Path(folder) / name


@dataclass
class IngestReport:
    images: int = 0
    series_ids: set[int] = field(default_factory=set)
    resumable: set[int] = field(default_factory=set)  # series of files recorded earlier, still in flight
    rejected: int = 0
    skipped: int = 0
    quarantined: int = 0
    reprocessed: int = 0
    problems: list[tuple[str, Status, str]] = field(default_factory=list)  # (path, status, reason)

    def add(self, other: IngestReport) -> None:
        self.images += other.images
        self.series_ids |= other.series_ids
        self.resumable |= other.resumable
        self.rejected += other.rejected
        self.skipped += other.skipped
        self.quarantined += other.quarantined
        self.reprocessed += other.reprocessed
        self.problems.extend(other.problems)


def known_paths() -> dict[str, tuple[int, str]]:
    """Paths of recorded files still in place → (series id, status); a rescan skips them.

    In flight and ERROR only: after DONE, QUARANTINED or SKIPPED the original was removed or moved
    away, so a file now at that path is a new arrival and is read like any other.
    """
    rows = Image.objects.filter(status__in=(*IN_FLIGHT, Status.ERROR)).values_list("path", "series_id", "status")
    return {path: (series_id, status) for path, series_id, status in rows}


def ingest_paths(paths: Iterable[Path], chunk: int = 500) -> IngestReport:
    """Ingest the given files (chunked so that a huge folder does not hold one long transaction).

    Files recorded earlier and still in flight are not read again, but their series are reported, so
    that `sendit import --wait` run again after a crash finishes them.
    """
    report = IngestReport()
    known = known_paths()
    batch: list[tuple[str, Path]] = []
    for path in paths:
        name = files.stored_name(path)
        if name in known:
            series_id, status = known[name]
            if status in IN_FLIGHT:
                report.resumable.add(series_id)
            continue
        batch.append((name, path))
        if len(batch) >= chunk:
            report.add(_ingest_batch(batch))
            batch = []
    if batch:
        report.add(_ingest_batch(batch))
    return report


def _ingest_batch(batch: list[tuple[str, Path]]) -> IngestReport:
    report = IngestReport()
    headers: dict[str, tuple[str, FileHeader]] = {}
    for name, path in batch:
        header = read_header(path)
        if isinstance(header, RejectedFile):
            _record_rejected(name, header, report)
            continue
        if header.sop_instance_uid in headers:  # the same instance twice in one delivery
            first_name, _ = headers[header.sop_instance_uid]
            same = files.sha256_of(files.original(first_name)) == files.sha256_of(path)
            _record_duplicate(name, same, None, report)
            continue
        headers[header.sop_instance_uid] = (name, header)
    if not headers:
        return report
    again: list[tuple[str, FileHeader]] = []
    with transaction.atomic():
        known_uids = Image.objects.filter(sop_instance_uid__in=list(headers)).values_list("sop_instance_uid", flat=True)
        for uid in set(known_uids):
            again.append(headers.pop(uid))
        study_uids = {header.series.study_uid for _, header in headers.values()}
        Study.objects.bulk_create([Study(study_uid=uid) for uid in study_uids], ignore_conflicts=True)
        studies = {s.study_uid: s for s in Study.objects.filter(study_uid__in=study_uids)}
        series_headers = {header.series.series_uid: header.series for _, header in headers.values()}
        Series.objects.bulk_create(
            [
                Series(study=studies[h.study_uid], series_uid=uid, modality=h.modality[:16], header=asdict(h))
                for uid, h in series_headers.items()
            ],
            ignore_conflicts=True,
        )
        series_map = {s.series_uid: s for s in Series.objects.filter(series_uid__in=list(series_headers))}
        Image.objects.bulk_create(
            [
                Image(series=series_map[h.series.series_uid], sop_instance_uid=uid, path=name, size=h.size)
                for uid, (name, h) in headers.items()
            ],
            ignore_conflicts=True,  # another ingestor (watcher and `sendit import`) may have won the race
        )
        rows = Image.objects.filter(sop_instance_uid__in=list(headers)).values_list(
            "id", "series_id", "sop_instance_uid", "path"
        )
        mine: list[tuple[int, int]] = []
        for image_id, series_id, uid, stored in rows:
            if stored == headers[uid][0]:
                mine.append((image_id, series_id))
            else:
                again.append(headers.pop(uid))
        Event.objects.bulk_create(
            [Event(series_id=sid, image_id=iid, to_status=Status.NEW, reason="ingested") for iid, sid in mine]
        )
        touched = {series_id for _, series_id in mine}
        for series in Series.objects.filter(pk__in=touched):
            refresh_series_status(series)
        report.images += len(mine)
        report.series_ids |= touched
    # Files are moved (duplicates, conflicts) only outside the transaction that records new images,
    # so a rolled-back batch never leaves a moved file without its row.
    for name, header in again:
        image = Image.objects.select_related("series").filter(sop_instance_uid=header.sop_instance_uid).first()
        if image is not None:
            with transaction.atomic():
                _arrived_again(name, header, image, report)
    return report


def _arrived_again(name: str, header: FileHeader, image: Image, report: IngestReport) -> None:
    """The same SOPInstanceUID again: a duplicate in flight, a re-send after DONE, or a conflict."""
    if name == image.path and image.status in (*IN_FLIGHT, Status.ERROR):
        if image.status in IN_FLIGHT:  # the very file already recorded (seen by a concurrent scan)
            report.resumable.add(image.series_id)
        return
    path = files.original(name)
    if image.status in IN_FLIGHT:
        first = files.original(image.path)
        same = (
            first.exists() and first.stat().st_size == header.size and files.sha256_of(first) == files.sha256_of(path)
        )
        _record_duplicate(name, same, image, report)
        return
    digest = files.sha256_of(path)
    if image.sha256 and image.sha256 != digest:
        _record_duplicate(name, False, image, report)
        return
    # Arrived again after it finished: process it again; deterministic UIDs land on the same output.
    old = image.status
    Image.objects.filter(pk=image.pk).update(
        path=name, size=header.size, status=Status.NEW, reason="", attempts=0, cleaned_at=None, set_aside_at=""
    )
    Event.objects.create(
        series=image.series, image=image, from_status=old, to_status=Status.NEW, reason="arrived again; reprocessing"
    )
    refresh_series_status(image.series)
    report.reprocessed += 1
    report.series_ids.add(image.series_id)


def _record_duplicate(name: str, same: bool, image: Image | None, report: IngestReport) -> None:
    if same:
        reason = "duplicate of an instance already in progress" + (f" (image #{image.pk})" if image else "")
        status, folder = Status.SKIPPED, "skipped"
        report.skipped += 1
    else:
        reason = "conflict: same SOPInstanceUID with different content" + (f" (image #{image.pk})" if image else "")
        status, folder = Status.QUARANTINED, "quarantine"
        report.quarantined += 1
    stored = files.set_aside(name, folder)
    ReceivedFile.objects.create(path=name, status=status, reason=clip(reason), stored_at=stored, image=image)
    report.problems.append((name, status, reason))
    log.warning("%s: %s", name, reason)


def _record_rejected(name: str, rejected: RejectedFile, report: IngestReport) -> None:
    status = Status.SKIPPED if rejected.skip else Status.QUARANTINED
    stored = files.set_aside(name, "skipped" if rejected.skip else "quarantine")
    ReceivedFile.objects.create(path=name, status=status, reason=clip(rejected.reason), stored_at=stored)
    if rejected.skip:
        report.skipped += 1
    else:
        report.rejected += 1
    report.problems.append((name, status, rejected.reason))
    log.warning("%s: %s", name, rejected.reason)


def ingest_folder(root: Path) -> IngestReport:
    return ingest_paths(complete_files(root))

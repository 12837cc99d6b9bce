"""Ingest: complete files in → Study / Series / Image rows (status NEW), in bulk, by SeriesInstanceUID.

Headers only are read. Every file ends recorded: as an Image, or as a ReceivedFile that says why it
was rejected (moved to quarantine), skipped as a duplicate, or quarantined as a conflict.
"""

from __future__ import annotations

import hashlib
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
    """Paths already recorded → (series id, status); a rescan after a restart skips them.

    DONE images are left out: their originals are gone, so a file at the same path is a new arrival.
    """
    rows = Image.objects.exclude(status=Status.DONE).values_list("path", "series_id", "status")
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


def _file_digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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
            same = _file_digest(files.original(first_name)) == _file_digest(path)
            _record_duplicate(name, same, None, report)
            continue
        headers[header.sop_instance_uid] = (name, header)
    if not headers:
        return report
    with transaction.atomic():
        existing = {
            image.sop_instance_uid: image
            for image in Image.objects.filter(sop_instance_uid__in=list(headers)).select_related("series")
        }
        for uid in list(headers):
            if uid in existing:
                name, header = headers.pop(uid)
                _arrived_again(name, header, existing[uid], report)
        study_uids = {header.series.study_uid for _, header in headers.values()}
        studies = {s.study_uid: s for s in Study.objects.filter(study_uid__in=study_uids)}
        Study.objects.bulk_create(
            [Study(study_uid=uid) for uid in study_uids if uid not in studies], ignore_conflicts=True
        )
        studies = {s.study_uid: s for s in Study.objects.filter(study_uid__in=study_uids)}
        series_headers = {header.series.series_uid: header.series for _, header in headers.values()}
        series_map = {s.series_uid: s for s in Series.objects.filter(series_uid__in=list(series_headers))}
        Series.objects.bulk_create(
            [
                Series(
                    study=studies[header.study_uid],
                    series_uid=uid,
                    modality=header.modality[:16],
                    header=asdict(header),
                )
                for uid, header in series_headers.items()
                if uid not in series_map
            ],
            ignore_conflicts=True,
        )
        series_map = {s.series_uid: s for s in Series.objects.filter(series_uid__in=list(series_headers))}
        Image.objects.bulk_create(
            [
                Image(
                    series=series_map[header.series.series_uid],
                    sop_instance_uid=uid,
                    path=name,
                    size=header.size,
                )
                for uid, (name, header) in headers.items()
            ]
        )
        created = Image.objects.filter(sop_instance_uid__in=list(headers)).values_list("id", "series_id")
        Event.objects.bulk_create(
            [Event(series_id=sid, image_id=iid, to_status=Status.NEW, reason="ingested") for iid, sid in created]
        )
        touched = {series_map[header.series.series_uid] for _, header in headers.values()}
        for series in touched:
            refresh_series_status(series)
        report.images += len(headers)
        report.series_ids |= {series.pk for series in touched}
    return report


def _arrived_again(name: str, header: FileHeader, image: Image, report: IngestReport) -> None:
    """The same SOPInstanceUID again: a duplicate in flight, a re-send after DONE, or a conflict."""
    path = files.original(name)
    if image.status in IN_FLIGHT:
        first = files.original(image.path)
        same = first.exists() and first.stat().st_size == header.size and _file_digest(first) == _file_digest(path)
        _record_duplicate(name, same, image, report)
        return
    digest = _file_digest(path)
    if image.sha256 and image.sha256 != digest:
        _record_duplicate(name, False, image, report)
        return
    # Arrived again after it finished: process it again; deterministic UIDs land on the same output.
    old = image.status
    Image.objects.filter(pk=image.pk).update(path=name, size=header.size, status=Status.NEW, reason="", attempts=0)
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

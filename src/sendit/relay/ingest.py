"""Ingest: complete files in → Study / Series / Image rows (status NEW), in bulk, by SeriesInstanceUID.

Headers only are read. Every entry of a scanned folder ends visible: as an Image, as a ReceivedFile
that says why it was rejected (moved to quarantine), skipped as a duplicate or quarantined as a
conflict, or counted as ignored by a documented rule (in progress, hidden). No single entry can stop
a scan: whatever goes wrong with one file (its name, its header, a link, its length) is that file's
rejection, and the rest flows. Only the scan as a whole can fail (the folder unreadable, the database
down); the watcher records that in ScanState.

Rules (docs/operations.md): the walk's, shared with ``sendit deid`` (:mod:`sendit.dicomio.walk`):
in-progress (``NAME.tmpXXXX``) and hidden (``.name``) entries are never read, moved or deleted, and
are counted; a symbolic link is never followed; the walk is sorted name by name at every level, so
of two copies of one instance found in one scan, the one whose path sorts first is the image,
however the folder is chunked. Here: a link or special file is rejected once and moved to
quarantine (a link as the link), a path too long to record is set aside through its folder, a
folder that cannot be read is recorded and left in place. For the watcher, a file is taken only once
it has settled (:class:`Settle`); until then it is counted, never read, moved or recorded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from django.db import DatabaseError, IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.db.models import Q
from django.utils import timezone

from sendit.dicomio import NOT_REGULAR, SYMLINK, FileHeader, Kind, RejectedFile, read_header, read_header_of_bytes
from sendit.dicomio import walk as walk_folder
from sendit.identifiers.base import SeriesHeader
from sendit.relay import files, runtime
from sendit.relay.models import IN_FLIGHT, Event, Image, ReceivedFile, Series, Status, Study
from sendit.relay.transitions import clip, lock_series, refresh_series_status
from sendit.storage import TRANSFERS, Store, StoreConflict, read_small

log = logging.getLogger("sendit.ingest")

# A ScanState.ignored key beside the walk's (sendit.dicomio.walk: in_progress, hidden)
REJECTED_EARLIER = "rejected_earlier"  # rejected once and left in place (could not be moved); not recorded again
SETTLING = "settling"  # changed within STABLE_SECONDS: a producer may still be writing it; a later scan takes it


@dataclass(frozen=True)
class Entry:
    """One entry of a scanned folder: where it is on disk, how it is recorded, and what is wrong with it.

    ``how`` says what rejecting it does: ``move`` (to quarantine, a link as the link), ``long`` (a path
    too long for the usual move: renamed through its folder into quarantine/too-long/), ``keep``
    (left in place: a folder that cannot be read, so that fixing its permissions is enough).
    """

    path: Path
    name: str
    problem: str = ""
    how: str = "move"


def walk(
    root: Path, ignored: Counter[str] | None = None, listed: Callable[[Path, int], None] | None = None
) -> Iterator[Entry]:
    """Every entry under ``root`` to record, in name order at each level; ignored ones counted.

    ``root`` itself may be a link (the configured folder); nothing below it is followed. Raises only
    when ``root`` cannot be listed: that is the whole scan failing. ``listed`` as for
    :func:`sendit.dicomio.walk`.
    """
    top = root.resolve()
    prefix = files.stored_name(top, follow=True)
    prefix = "" if prefix in ("", ".") else prefix + "/"

    def enter(path: Path, rel: str) -> bool:  # a folder whose path is too long is set aside whole
        return not files.too_long(path, prefix + rel)

    for found in walk_folder(top, ignored=ignored, name=files.escape_name, enter=enter, listed=listed):
        stored = prefix + found.rel
        too_long = files.too_long(found.path, stored)
        if too_long:
            yield Entry(found.path, files.recordable(stored), too_long, how="long")
        elif found.kind is Kind.FILE:
            yield Entry(found.path, stored)
        else:  # a link or special file (moved away), or a folder that cannot be read (left in place)
            yield Entry(
                found.path, stored, found.problem, how="keep" if found.kind is Kind.UNREADABLE_FOLDER else "move"
            )


def complete_files(root: Path, ignored: Counter[str] | None = None) -> Iterator[Entry]:
    """The entries of ``root`` to ingest (for `sendit import` of a folder); see ``walk``."""
    return walk(root, ignored)


def entry_for(path: Path) -> Entry:
    """An explicitly named file (`sendit import FILE`): the same rules as for an entry of a walk."""
    name = files.stored_name(path)
    too_long = files.too_long(path, name)
    if too_long:
        return Entry(path, files.recordable(name), too_long, how="long")
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return Entry(path, name)  # the header read tells: vanished, or why it cannot be read
    if stat.S_ISLNK(mode):
        return Entry(path, name, SYMLINK)
    if not stat.S_ISREG(mode):
        return Entry(path, name, NOT_REGULAR)
    return Entry(path, name)


class Settle:
    """Which files of a scan are complete, for producers that write in place (docs/operations.md,
    Settle time).

    A file is settled when neither it nor anything in its folder (the folder itself, every other
    file in it, ignored ones included) changed within ``seconds``: a producer that pauses half-way
    through a file, or between files, is not cut short. A file that ``arrived`` by a rename the
    watcher saw (from a `.tmp` or hidden name, or from outside the input folder: path → when it was
    seen; a folder covers what is below it) is settled at once, unless it changed after that.
    "Changed" is :func:`sendit.relay.files.last_change`, compared with this host's clock. ``due``
    is the earliest time a file left now settles: the watcher scans again then. ``taken_from``: the
    folders of the files found ready (the watcher removes such a folder once emptied and settled).
    """

    def __init__(self, seconds: float, arrived: Mapping[Path, float] | None = None, now: float | None = None) -> None:
        self.seconds = seconds
        self.arrived = arrived or {}
        self.now = time.time() if now is None else now
        self.due: float | None = None
        self.taken_from: set[Path] = set()
        self._folders: dict[Path, float] = {}

    def ready(self, path: Path) -> bool:
        if not self._settled(path):
            return False
        self.taken_from.add(path.parent)
        return True

    def _settled(self, path: Path) -> bool:
        if self.seconds <= 0:
            return True
        changed = files.last_change(path)
        if changed is None:
            return True  # gone, or out of reach: the usual handling says what it is
        arrived = self._arrival(path)
        if arrived is not None and changed <= arrived:
            return True
        settles = max(changed, self._folder(path.parent)) + self.seconds
        if settles <= self.now:
            return True
        self.due = settles if self.due is None else min(self.due, settles)
        return False

    def _arrival(self, path: Path) -> float | None:
        if not self.arrived:
            return None
        for candidate in (path, *path.parents):
            if candidate in self.arrived:
                return self.arrived[candidate]
        return None

    def _folder(self, folder: Path) -> float:
        """The last change in a folder: to the folder itself, or to any file in it; once per scan."""
        if folder not in self._folders:
            own = files.last_change(folder)
            latest = float("-inf") if own is None else own
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        try:
                            if not entry.is_dir(follow_symlinks=False):
                                latest = max(latest, files.changed_at(entry.stat(follow_symlinks=False)))
                        except OSError:
                            continue  # gone since the listing
            except OSError:
                pass  # gone, or unreadable: the folder's own change is all there is
            self._folders[folder] = latest
        return self._folders[folder]


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
    ignored: Counter[str] = field(default_factory=Counter)  # by rule: in_progress, hidden, rejected_earlier, settling

    @classmethod
    def of(cls, parts: Iterable[IngestReport]) -> IngestReport:
        """One report of several (a scan's chunks)."""
        report = cls()
        for part in parts:
            report.add(part)
        return report

    def add(self, other: IngestReport) -> None:
        self.images += other.images
        self.series_ids |= other.series_ids
        self.resumable |= other.resumable
        self.rejected += other.rejected
        self.skipped += other.skipped
        self.quarantined += other.quarantined
        self.reprocessed += other.reprocessed
        self.problems.extend(other.problems)
        self.ignored.update(other.ignored)


def known_paths() -> dict[str, tuple[int, str]]:
    """Paths of recorded files still in place → (series id, status); a rescan skips them unread.

    In flight and ERROR, and DONE until clean-up has run (its original is still there, about to be
    removed: reading it again would race clean-up). After clean-up, QUARANTINED or SKIPPED the
    original was removed or moved away, so a file now at that path is a new arrival.
    """
    rows = Image.objects.filter(
        Q(status__in=(*IN_FLIGHT, Status.ERROR)) | Q(status=Status.DONE, cleaned_at__isnull=True)
    ).values_list("path", "series_id", "status")
    return {path: (series_id, status) for path, series_id, status in rows}


def rejected_in_place() -> dict[str, datetime]:
    """Rejected entries that could not be moved away (stored nowhere) → when they were recorded."""
    latest: dict[str, datetime] = {}
    # a person's retry resolves the row: the next scan takes the file again
    for path, created in ReceivedFile.objects.filter(stored_at="", resolved="").values_list("path", "created"):
        if path not in latest or created > latest[path]:
            latest[path] = created
    return latest


def _unchanged_since(path: Path, recorded: datetime) -> bool:
    """The entry recorded then is still the one there: not created, renamed or written since (ctime)."""
    try:
        return os.lstat(path).st_ctime <= recorded.timestamp()
    except OSError:
        return True  # gone, or too long to look at: nothing new to record


def ingest_paths(paths: Iterable[Path | Entry], chunk: int = 500, settle: Settle | None = None) -> IngestReport:
    """Ingest the given files (chunked so that a huge folder does not hold one long transaction).

    Files recorded earlier and still in flight are not read again, but their series are reported, so
    that `sendit import --wait` run again after a crash finishes them. With ``settle`` (the watcher),
    a file not yet settled is counted and left for a later scan; without (`sendit import`, the
    operator's word that the files are complete) every file is taken now.
    """
    return IngestReport.of(ingest_in_chunks(paths, first=chunk, largest=chunk, settle=settle))


def ingest_in_chunks(
    paths: Iterable[Path | Entry], first: int = 100, largest: int = 500, settle: Settle | None = None
) -> Iterator[IngestReport]:
    """As :func:`ingest_paths`, one report per committed chunk, so that processing can start on the
    first chunk while the next is read (issue 17). Chunks double from ``first`` to ``largest`` files:
    the first series are handed on soon, and a huge folder still never holds one long transaction.
    A series of files recorded earlier and still in flight comes in the report of the chunk that met it."""
    report = IngestReport()
    known = known_paths()
    earlier = rejected_in_place()
    batch: list[Entry] = []
    chunk = max(1, first)
    for item in paths:
        entry = item if isinstance(item, Entry) else entry_for(item)
        if entry.name in known:
            series_id, status = known[entry.name]
            if status in IN_FLIGHT:
                report.resumable.add(series_id)
            continue
        if entry.name in earlier and _unchanged_since(entry.path, earlier[entry.name]):
            report.ignored[REJECTED_EARLIER] += 1
            continue
        if settle is not None and entry.how != "keep" and not settle.ready(entry.path):
            report.ignored[SETTLING] += 1  # a link or a long path too: its folder may still be written
            continue
        if entry.problem:
            _reject(entry, entry.problem, report)
            continue
        batch.append(entry)
        if len(batch) >= chunk:
            _ingest_chunk(batch, report)
            yield report
            report, batch, chunk = IngestReport(), [], min(largest, chunk * 2)
    if batch:
        _ingest_chunk(batch, report)
    yield report


def series_left_behind(parts: Iterable[IngestReport]) -> Iterator[tuple[IngestReport, set[int]]]:
    """Each chunk's report with the new series the walk has left by then: a series still being read
    waits for the next chunk, so that it is not run for half its files (a series met again later is
    simply handed on again). A last, empty report comes with the series still held."""
    reading: set[int] = set()
    for part in parts:
        yield part, reading - part.series_ids
        reading = set(part.series_ids)
    yield IngestReport(), reading


def ingest_new_files(paths: Iterable[Path]) -> IngestReport:
    """Ingest files at fresh names that nothing recorded yet (the listener's,
    :mod:`sendit.relay.received`): what ``ingest_paths`` does, without the scan's bookkeeping
    (paths recorded earlier, rejections left in place), which costs a query over every file in
    flight. Raises when the database fails."""
    report = IngestReport()
    entries = [entry_for(path) for path in paths]
    for entry in entries:
        if entry.problem:
            _reject(entry, entry.problem, report)
    batch = [entry for entry in entries if not entry.problem]
    if batch:
        _ingest_chunk(batch, report)
    return report


class _NotPlain(Exception):
    """This instance needs the general path (a duplicate, a conflict, a rejection): decided there."""


def ingest_new_file(entry: Entry, data: bytes, read_from: Path, before_commit: Callable[[], None]) -> IngestReport:
    """Record one instance that arrives at a fresh name (the listener's), while it is made durable.

    ``entry`` is where it will be (as :func:`entry_for` names it); ``data`` its bytes, being
    written to ``read_from`` (the temporary name; named in a truncation's reason only);
    ``before_commit`` waits until it is durable at ``entry.path`` (written, fsynced, renamed, the
    folder fsynced) and raises OSError when it
    cannot. Its rows are written in one transaction whose commit waits for ``before_commit``: the
    database's work overlaps the fsync, and no row is ever committed for a file that is not
    durable (it raises, the transaction rolls back, and nothing is recorded).

    The plain case only (a new instance, no object store, a readable header): its series' status is
    recomputed only when it is not NEW (a NEW image added to a NEW series leaves it NEW). Anything
    else (a duplicate, a conflict, a rejection, originals uploaded to a store) goes through
    :func:`ingest_new_files` once the file is durable, exactly as before. Raises when the database fails.
    """
    header = read_header_of_bytes(data, read_from)  # from memory: no file read back, no syscalls
    if entry.problem or isinstance(header, RejectedFile) or runtime.store() is not None:
        before_commit()
        return ingest_new_files([entry.path])
    report = IngestReport()
    try:
        with transaction.atomic():
            _record_plain(entry, header, report)
            before_commit()
    except (_NotPlain, IntegrityError):  # rolled back: the general path decides, with the file durable
        before_commit()  # raises again if it failed; a no-op once it succeeded
        return ingest_new_files([entry.path])
    return report


def _record_plain(entry: Entry, header: FileHeader, report: IngestReport) -> None:
    """The rows of one new instance (as ``_ingest_batch`` writes them), in the caller's transaction."""
    if connection.vendor == "postgresql":
        _record_plain_in_one_statement(entry, header, report)
        return
    known, series_id, series_status = _lookup(header.sop_instance_uid, header.series.series_uid)
    if known:
        raise _NotPlain  # arrived again: a duplicate, a re-send, or a conflict
    found = None if series_id is None else (series_id, series_status)
    if found is None:
        found = _new_series(header)
    series_id, series_status = found
    image = Image.objects.create(
        series_id=series_id, sop_instance_uid=header.sop_instance_uid, path=entry.name, size=header.size
    )
    Event.objects.create(series_id=series_id, image=image, to_status=Status.NEW, reason="ingested")
    if series_status != Status.NEW:  # a NEW image in a NEW series leaves it NEW (aggregate_status)
        refresh_series_status(Series.objects.get(pk=series_id))
    report.images += 1
    report.series_ids.add(series_id)


def _record_plain_in_one_statement(entry: Entry, header: FileHeader, report: IngestReport) -> None:
    """:func:`_record_plain` on PostgreSQL: the look-up, the Image and its Event in one statement
    (:func:`_plain_statement`), one round trip instead of three, each of which waits for the server
    (on a loaded host, for a core). Creating a series, and the status of a series that is not NEW,
    as in :func:`_record_plain` (once per series, or not on this path)."""
    image = Image(sop_instance_uid=header.sop_instance_uid, path=entry.name, size=header.size)
    event = Event(to_status=Status.NEW, reason="ingested")
    sql, image_fields, event_fields = _plain_statement()
    params = [header.series.series_uid]
    params += [field.get_db_prep_save(field.pre_save(image, True), connection) for field in image_fields]
    params += [field.get_db_prep_save(field.pre_save(event, True), connection) for field in event_fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        _, series_id, series_status, image_id = cursor.fetchone()
        if series_id is None:  # the series' first instance: its rows, then the same statement
            _new_series(header)
            cursor.execute(sql, params)
            _, series_id, series_status, image_id = cursor.fetchone()
    if image_id is None:
        raise _NotPlain  # arrived again (ON CONFLICT DO NOTHING): a duplicate, a re-send, or a conflict
    if series_status != Status.NEW:  # a NEW image in a NEW series leaves it NEW (aggregate_status)
        refresh_series_status(Series.objects.get(pk=series_id))
    report.images += 1
    report.series_ids.add(series_id)


_PLAIN: tuple[str, list[Any], list[Any]] | None = None


def _plain_statement() -> tuple[str, list[Any], list[Any]]:
    """The statement of :func:`_record_plain_in_one_statement` (PostgreSQL), and the fields whose
    values it takes after the SeriesInstanceUID, in order. Every column of the two models but the
    keys, so that a field added later is written as Django would write it.

    It also makes the transaction's commit asynchronous: see :func:`_lookup`.
    """
    global _PLAIN
    if _PLAIN is None:
        image_fields = [f for f in Image._meta.concrete_fields if not f.primary_key and f.name != "series"]
        event_fields = [
            f for f in Event._meta.concrete_fields if not f.primary_key and f.name not in ("series", "image")
        ]
        quote = connection.ops.quote_name
        image_columns = ", ".join(quote(str(f.column)) for f in image_fields)
        event_columns = ", ".join(quote(str(f.column)) for f in event_fields)
        image_values = ", ".join(["%s"] * len(image_fields))
        event_values = ", ".join(["%s"] * len(event_fields))
        series_table, image_table, event_table = (quote(model._meta.db_table) for model in (Series, Image, Event))
        sql = (
            f"WITH s AS (SELECT id, status FROM {series_table} WHERE series_uid = %s),"  # noqa: S608 (no input)
            f" i AS (INSERT INTO {image_table} (series_id, {image_columns}) SELECT s.id, {image_values} FROM s"
            " ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING id, series_id),"
            f" e AS (INSERT INTO {event_table} (series_id, image_id, {event_columns})"
            f" SELECT i.series_id, i.id, {event_values} FROM i)"
            " SELECT set_config('synchronous_commit', 'off', true),"
            " (SELECT id FROM s), (SELECT status FROM s), (SELECT id FROM i)"
        )
        _PLAIN = (sql, image_fields, event_fields)
    return _PLAIN


def _new_series(header: FileHeader) -> tuple[int, str]:
    """The Study and Series rows of a series' first instance (:func:`_series_rows`); its id and status."""
    series = _series_rows([header.series])[header.series.series_uid]
    return series.pk, series.status


def _series_rows(headers: Iterable[SeriesHeader]) -> dict[str, Series]:
    """The Study and Series rows of these series, made where missing (or left to another transaction
    that is making them at the same time: ignore_conflicts); by SeriesInstanceUID."""
    by_uid = {h.series_uid: h for h in headers}
    study_uids = {h.study_uid for h in by_uid.values()}
    Study.objects.bulk_create([Study(study_uid=uid) for uid in study_uids], ignore_conflicts=True)
    studies = {s.study_uid: s for s in Study.objects.filter(study_uid__in=study_uids)}
    Series.objects.bulk_create(
        [
            Series(study=studies[h.study_uid], series_uid=uid, modality=h.modality[:16], header=asdict(h))
            for uid, h in by_uid.items()
        ],
        ignore_conflicts=True,
    )
    return {s.series_uid: s for s in Series.objects.filter(series_uid__in=list(by_uid))}


def _lookup(sop_instance_uid: str, series_uid: str) -> tuple[bool, int | None, str | None]:
    """In one round trip: is this instance recorded, and its series' id and status if it exists.

    On PostgreSQL the same round trip makes the transaction's commit asynchronous
    (``set_config('synchronous_commit', 'off', true)``, i.e. ``SET LOCAL``): the commit returns before
    its WAL record is flushed, which would otherwise be a second flush after the file's own fsync
    (≈ 4 ms here). The file is durable before the commit is even asked for, and a row lost with
    PostgreSQL's last fraction of a second is recorded again from that file
    (:func:`sendit.relay.received.recover`, run at every start and by :class:`sendit.relay.received.
    DatabaseWatch` after PostgreSQL restarted under a running listener); docs/operations.md says why
    this keeps the listener's promise. SQLite (WAL, ``synchronous=NORMAL``) never flushes at a
    commit anyway.
    """
    image, series = Image._meta.db_table, Series._meta.db_table
    asynchronous = "set_config('synchronous_commit', 'off', true), " if connection.vendor == "postgresql" else ""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {asynchronous}(SELECT 1 FROM {image} WHERE sop_instance_uid = %s),"  # noqa: S608 (no input)
            f" (SELECT id FROM {series} WHERE series_uid = %s),"
            f" (SELECT status FROM {series} WHERE series_uid = %s)",
            [sop_instance_uid, series_uid, series_uid],
        )
        *_, known, series_id, status = cursor.fetchone()
    return known is not None, series_id, status


def _connection_trouble(exc: Exception) -> bool:
    """The database itself is unwell (down, locked, deadlock): the scan fails and the next one retries."""
    return isinstance(exc, (OperationalError, InterfaceError))


def _ingest_chunk(batch: list[Entry], report: IngestReport) -> None:
    """One transaction for the chunk; if one file's row spoils it, each file again on its own."""
    try:
        _ingest_batch(batch, report)
        return
    except (DatabaseError, ValueError) as exc:
        if _connection_trouble(exc):
            raise
        log.warning(
            "a chunk of %s file(s) could not be recorded (%s); recording one by one", len(batch), type(exc).__name__
        )
    for entry in batch:
        try:
            _ingest_batch([entry], report)
        except (DatabaseError, ValueError) as exc:
            if _connection_trouble(exc):
                raise
            _reject(entry, f"could not be recorded ({type(exc).__name__})", report)


def _ingest_batch(batch: list[Entry], report: IngestReport) -> None:
    order = {entry.name: position for position, entry in enumerate(batch)}
    headers: dict[str, tuple[Entry, FileHeader]] = {}
    again: list[tuple[Entry, FileHeader]] = []  # the same instance as a recorded image: decided after commit
    for entry in batch:
        header = read_header(entry.path)
        if isinstance(header, RejectedFile):
            if not header.gone:  # a file that vanished since the listing is no one's problem
                _reject(entry, header.reason, report, skip=header.skip)
            continue
        if header.sop_instance_uid in headers:  # a second copy in this chunk: the first (sorted) is the image
            again.append((entry, header))
            continue
        headers[header.sop_instance_uid] = (entry, header)
    store = runtime.store()
    uploaded: dict[str, tuple[str, str]] = {}  # SOPInstanceUID → (key, SHA-256) of originals now in the store
    if headers and store is not None:
        uploaded = _upload_originals(store, headers, report)
    taken: list[Entry] = []  # files that became images in this batch (committed below)
    if headers:
        with transaction.atomic():
            known_uids = Image.objects.filter(sop_instance_uid__in=list(headers)).values_list(
                "sop_instance_uid", flat=True
            )
            for uid in set(known_uids):
                again.append(headers.pop(uid))
            series_map = _series_rows(header.series for _, header in headers.values())
            Image.objects.bulk_create(
                [
                    Image(
                        series=series_map[h.series.series_uid],
                        sop_instance_uid=uid,
                        path=entry.name,
                        size=h.size,
                        stored_key=uploaded.get(uid, ("", ""))[0],
                        sha256=uploaded.get(uid, ("", ""))[1],
                    )
                    for uid, (entry, h) in headers.items()
                ],
                ignore_conflicts=True,  # another ingestor (watcher and `sendit import`) may have won the race
            )
            rows = Image.objects.filter(sop_instance_uid__in=list(headers)).values_list(
                "id", "series_id", "sop_instance_uid", "path"
            )
            mine: list[tuple[int, int]] = []
            for image_id, series_id, uid, stored in rows:
                if stored == headers[uid][0].name:
                    mine.append((image_id, series_id))
                    taken.append(headers[uid][0])
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
    if store is not None:
        for entry in taken:  # uploaded and recorded, both committed: the input folder's copy may go
            files.remove_original(entry.name)
    # Files are moved (duplicates, conflicts) only outside the transaction that records new images,
    # so a rolled-back batch never leaves a moved file without its row. In walk order: of two copies,
    # the one that sorts first is decided first.
    for entry, header in sorted(again, key=lambda pair: order[pair[0].name]):
        image = Image.objects.select_related("series").filter(sop_instance_uid=header.sop_instance_uid).first()
        if image is not None:  # None: pruned in between; the next scan reads the file as new
            _arrived_again(entry, header, image, report)


def _arrived_again(entry: Entry, header: FileHeader, image: Image, report: IngestReport) -> None:
    """The same SOPInstanceUID as a recorded image: the very file, a duplicate, a re-send, or a conflict."""
    if image.status == Status.DONE and image.cleaned_at is None:
        # Its original awaits clean-up. At its own path this file is that original; at another path
        # it is left alone, not recorded, until clean-up has run: the next scan decides then. So a
        # scan never races clean-up.
        return
    if image.status in (*IN_FLIGHT, Status.ERROR):
        if entry.name == image.path and not image.stored_key:  # the very file already recorded (a concurrent scan)
            if image.status in IN_FLIGHT:
                report.resumable.add(image.series_id)
            return
        if image.stored_key:  # its original is in the store: the recorded SHA-256 tells
            try:
                same = files.sha256_of(entry.path) == image.sha256
            except FileNotFoundError:
                return
            if entry.name == image.path and same:
                # its upload and row were committed, the removal not yet (a concurrent scan): that one removes it
                return
            _record_duplicate(entry, same, image, report)
            return
        # a second copy while the first is in flight, or waits for a retry (its original still in place)
        first = files.original(image.path)
        try:
            same = first.stat().st_size == header.size and files.sha256_of(first) == files.sha256_of(entry.path)
        except FileNotFoundError:
            return  # one of the two vanished meanwhile: the next scan decides
        _record_duplicate(entry, same, image, report)
        return
    # finished: DONE and cleaned up, QUARANTINED or SKIPPED
    try:
        data = read_small(entry.path, header.size) if runtime.store() is not None else None
        digest = hashlib.sha256(data).hexdigest() if data is not None else files.sha256_of(entry.path)
    except FileNotFoundError:
        return
    if image.sha256 and image.sha256 != digest:
        _record_duplicate(entry, False, image, report)
        return
    # Arrived again after it finished: process it again; deterministic UIDs land on the same output.
    store = runtime.store()
    key = ""
    if store is not None:
        key = files.original_key(digest)
        try:
            store.put_new(key, data if data is not None else entry.path, digest)
        except StoreConflict as exc:
            _reject(entry, f"conflict: {exc}", report)
            return
        except FileNotFoundError:
            return
    old = image.status
    with transaction.atomic():
        lock_series(image.series_id)
        guarded = Image.objects.filter(pk=image.pk, status=old)
        if old == Status.DONE:
            guarded = guarded.filter(cleaned_at__isnull=False)
        changed = guarded.update(
            path=entry.name,
            size=header.size,
            status=Status.NEW,
            reason="",
            attempts=0,
            cleaned_at=None,
            set_aside_at="",
            stored_key=key,
            sha256=digest if key else image.sha256,
            updated=timezone.now(),
        )
        if not changed:
            # Another writer moved this image first: a concurrent scan re-admitted it from another
            # copy, or a person acted on it. That writer won; this file stays where it is, and the
            # next scan decides against the new state (then most likely a duplicate in flight).
            return
        Event.objects.create(
            series=image.series,
            image=image,
            from_status=old,
            to_status=Status.NEW,
            reason="arrived again; reprocessing",
        )
        refresh_series_status(image.series)
    report.reprocessed += 1
    report.series_ids.add(image.series_id)
    if key:  # uploaded and recorded, both committed
        files.remove_original(entry.name)


def _upload_originals(
    store: Store, headers: dict[str, tuple[Entry, FileHeader]], report: IngestReport
) -> dict[str, tuple[str, str]]:
    """Upload the originals of a batch to the store before their rows are written; returns
    SOPInstanceUID → (key, SHA-256).

    1. Leave out instances already recorded (the transaction decides about those, as without a store).
    2. Hash each file and upload it create-only under its SHA-256, on a few threads; a file of up to
       64 MiB is read once for both, so the bytes uploaded are the bytes hashed.
    3. A conflict (other bytes under that key) is that file's rejection; a file gone since is dropped.
    Raises StoreError when the store is out of reach: the scan fails, every file stays where it is,
    and the next scan tries again.
    """
    known = set(Image.objects.filter(sop_instance_uid__in=list(headers)).values_list("sop_instance_uid", flat=True))
    todo = {uid: (entry, header.size) for uid, (entry, header) in headers.items() if uid not in known}
    if not todo:
        return {}

    def upload(item: tuple[Entry, int]) -> str:
        entry, size = item
        data = read_small(entry.path, size)
        digest = hashlib.sha256(data).hexdigest() if data is not None else files.sha256_of(entry.path)
        store.put_new(files.original_key(digest), data if data is not None else entry.path, digest)
        return digest

    with ThreadPoolExecutor(max_workers=min(TRANSFERS, len(todo)), thread_name_prefix="sendit-upload") as pool:
        futures = {uid: pool.submit(upload, item) for uid, item in todo.items()}
    uploaded: dict[str, tuple[str, str]] = {}
    for uid, future in futures.items():
        try:
            digest = future.result()
        except StoreConflict as exc:
            _reject(headers.pop(uid)[0], f"conflict: {exc}", report)
            continue
        except FileNotFoundError:
            headers.pop(uid)  # vanished since the listing: no one's problem
            continue
        uploaded[uid] = (files.original_key(digest), digest)
    return uploaded


def _record_duplicate(entry: Entry, same: bool, image: Image, report: IngestReport) -> None:
    """A second copy: SKIPPED when its bytes are the recorded image's, else a conflict; both name the image."""
    if same:
        waiting = "waiting for a retry" if image.status == Status.ERROR else "already in progress"
        reason = f"duplicate of an instance {waiting} (image #{image.pk})"
    else:
        reason = f"conflict: same SOPInstanceUID with different content (image #{image.pk} is the one processed)"
    _reject(entry, reason, report, skip=same, conflict=not same, image=image)


def _reject(
    entry: Entry,
    reason: str,
    report: IngestReport,
    *,
    skip: bool = False,
    conflict: bool = False,
    image: Image | None = None,
) -> None:
    """Record one entry that does not become an image, and move it out of the input folder if we may."""
    status = Status.SKIPPED if skip else Status.QUARANTINED
    folder = "skipped" if skip else "quarantine"
    stored = ""
    if entry.how != "keep" and files.inside_input(entry.name):
        try:
            if entry.how == "long":
                stored = files.set_aside_long(entry.path, entry.name)
            else:
                stored = files.set_aside(entry.name, folder, source=entry.path)
        except OSError as exc:  # left in place, recorded once: a rescan skips it while it is unchanged
            log.warning("%s could not be moved to %s (%s)", files.masked(entry.name), folder, type(exc).__name__)
    row = ReceivedFile.objects.create(
        path=entry.name, status=status, reason=clip(reason), stored_at=stored, image=image
    )
    if skip:
        report.skipped += 1
    elif conflict:
        report.quarantined += 1
    else:
        report.rejected += 1
    report.problems.append((entry.name, status, reason))
    log.warning("received file #%s (%s): %s", row.pk, files.masked(entry.name), reason)


def ingest_folder(
    root: Path, settle: Settle | None = None, listed: Callable[[Path, int], None] | None = None
) -> IngestReport:
    """One scan of ``root``; the report counts what was ignored by rule (``report.ignored``)."""
    return IngestReport.of(ingest_folder_in_chunks(root, settle, listed))


def ingest_folder_in_chunks(
    root: Path, settle: Settle | None = None, listed: Callable[[Path, int], None] | None = None
) -> Iterator[IngestReport]:
    """One scan of ``root``, a report per committed chunk (:func:`ingest_in_chunks`); what the walk
    ignored by rule comes in a last report of its own, once the walk is over."""
    ignored: Counter[str] = Counter()
    yield from ingest_in_chunks(walk(root, ignored, listed), settle=settle)
    yield IngestReport(ignored=ignored)

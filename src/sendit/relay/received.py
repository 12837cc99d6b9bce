"""Instances that arrive over the network (the C-STORE listener): made durable, recorded, held until
their series is idle.

An instance is written under a hidden folder of the input folder (``.sendit-received/<host>``,
which the watcher never reads: hidden names are skipped; one folder per host, so that with a shared
input folder each listener recovers only what it wrote itself), first to a hidden temporary name, fsynced, then
renamed to its final name and the folder fsynced (:class:`_Arriving`, the one place that decides
where and how an arriving instance is kept). It is recorded as an Image exactly as a file of the
input folder is, while the fsync runs, in a transaction that commits only once the file is durable
(:func:`keep`): duplicates and conflicts behave as for the folder. Only then does the listener
answer Success.

A series is complete when none of its instances arrived for SERIES_IDLE_SECONDS: each arrival puts
the series' ``next_attempt_at`` that far ahead (:func:`hold_series`), which keeps the periodic
requeue away from it; the listener enqueues it once the time has passed, and if the listener is gone
by then, the requeue finds it (a series with work to do, due, and no task).

After a crash (:func:`recover`): a temporary file was never answered Success and is removed; a
complete file that was not recorded (killed between the rename and the commit, or answered Success
and its row lost with the database's last commits) is recorded now, as the next scan of a folder
would. It runs at every start, and again when PostgreSQL restarted under a running listener
(:class:`DatabaseWatch`): on PostgreSQL the listener's commits do not wait for their WAL flush (the
file is already durable; :func:`sendit.relay.ingest.ingest_new_file`, docs/operations.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.db import connection
from django.utils import timezone

from sendit.relay.ingest import Entry, IngestReport, entry_for, ingest_new_file, ingest_new_files, ingest_paths, walk
from sendit.relay.models import Series
from sendit.relay.runtime import config

log = logging.getLogger("sendit.received")

#: below the input folder; hidden, so the watcher leaves it to the listener
RECEIVED_FOLDER = ".sendit-received"
#: a file being written; hidden (and so never ingested), removed by ``recover`` after a crash
PART_SUFFIX = ".part"


def received_folder() -> Path:
    """This host's folder: with a shared input folder (many hosts), each listener recovers only its own."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
    return Path(config().INPUT_FOLDER) / RECEIVED_FOLDER / host


def make_durable(data: bytes) -> Path:
    """Keep one arriving instance (DICOM file bytes, as received) so that a crash cannot lose it.

    1. Write it to a hidden temporary name in the received folder.
    2. fsync the file, rename it to its final name (a random name: nothing from the data set).
    3. fsync the folder, so that the rename itself survives a power cut.

    Returns the final path. Raises OSError (disk full, folder unwritable); then nothing is left
    behind. :func:`keep` does the same while the database records it.
    """
    arriving = _Arriving(data)
    arriving.durable()
    return arriving.final


def keep(data: bytes) -> IngestReport:
    """Keep one arriving instance and record it: what the listener does before it answers Success.

    The bytes are written to a temporary name, fsynced, renamed and the folder fsynced
    (:class:`_Arriving`) on a thread of their own while this one reads the header and writes the
    rows (:func:`sendit.relay.ingest.ingest_new_file`), whose commit waits for the file to be durable.
    So on return the instance is both durable and recorded, in about the time of the slower of the
    two rather than their sum. Raises OSError when it could not be made durable (nothing is recorded
    and nothing left behind), anything else when the database failed (the file is then durable and
    unrecorded, as after a crash between the two: :func:`record` explains, :func:`recover` records it).
    """
    with _GATE.shared():  # a recovery while the listener runs waits: it must not take this file too
        arriving = _Arriving(data)
        syncing = _SYNC.submit(arriving.durable)
        try:
            return ingest_new_file(_entry(arriving.final), data, arriving.temporary, syncing.result)
        finally:
            with contextlib.suppress(BaseException):
                syncing.result()  # never return with the fsync still running on this file


def _entry(final: Path) -> Entry:
    """How ``final`` is recorded: :func:`sendit.relay.ingest.entry_for`, worked out once per folder
    (every name in it has the same length) rather than with a dozen system calls per instance."""
    folder = final.parent
    known = _NAMES.get(folder)
    if known is None:
        entry = entry_for(final)
        if entry.problem or not entry.name.endswith("/" + final.name):
            return entry  # not the plain case: named and judged each time
        known = _NAMES[folder] = entry.name[: -len(final.name)]
    return Entry(final, known + final.name)


class _Gate:
    """Many :func:`keep` at once (shared), or one :func:`recover` alone (exclusive): a recovery must
    not record a file whose :func:`keep` is between its rename and its commit. A waiting recovery
    goes first (new keeps wait for it), so that a busy listener cannot put it off for ever."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._keeping = 0
        self._recovering = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            while self._recovering:
                self._changed.wait()
            self._keeping += 1
        try:
            yield
        finally:
            with self._changed:
                self._keeping -= 1
                if not self._keeping:
                    self._changed.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._changed:
            while self._recovering:
                self._changed.wait()
            self._recovering = True
            while self._keeping:
                self._changed.wait()
        try:
            yield
        finally:
            with self._changed:
                self._recovering = False
                self._changed.notify_all()


_GATE = _Gate()

#: received folder → its recorded name with a trailing slash
_NAMES: dict[Path, str] = {}

#: threads that make arriving instances durable while their association's thread records them
_SYNC = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sendit-fsync")


class _Arriving:
    """One arriving instance: its names now; :meth:`durable` writes and keeps it (on a thread of its own
    in :func:`keep`, so that the association's thread gives up the GIL as seldom as possible)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.folder = received_folder()
        name = uuid.uuid4().hex
        self.temporary = self.folder / f".{name}{PART_SUFFIX}"
        self.final = self.folder / f"{name}.dcm"

    def durable(self) -> None:
        """Write, fsync, rename to the final name, fsync the folder. Raises OSError; then nothing is left."""
        if not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
            _fsync_folder(self.folder.parent)
        descriptor = os.open(self.temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(self.data)
                while view:
                    written = os.write(descriptor, view)
                    view = view[written:]
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.rename(self.temporary, self.final)
        except BaseException:
            self.temporary.unlink(missing_ok=True)
            raise
        try:
            _fsync_folder(self.folder)
        except BaseException:  # not known to be durable: not kept, and not left for recover() either
            self.final.unlink(missing_ok=True)
            raise


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def record(path: Path) -> IngestReport:
    """Record one kept instance as the folder's files are.

    Raises when the database fails; the file is then left where it is (whether the commit went
    through is unknown when the connection broke in it) and the caller answers a failure, so the
    sender sends it again: :func:`recover` records the file at the next start if nothing did, and
    the sender's copy then lands as a duplicate (SKIPPED), or the other way round. Nothing is lost
    and nothing reaches the destination twice.
    """
    return ingest_new_files([path])


def hold_series(series_ids: set[int], seconds: float) -> None:
    """Keep these series out of the pipeline until ``seconds`` after now (see the module's docstring).

    A plain UPDATE: every writer moves the time forward to its own arrival, so the last one wins,
    which is the point; a worker that finishes the series meanwhile clears it, and the listener's
    enqueue after the idle time (or the requeue) picks up what arrived since.
    """
    if series_ids:
        due = timezone.now() + timedelta(seconds=seconds)
        Series.objects.filter(pk__in=series_ids).update(next_attempt_at=due)


def recover() -> IngestReport:
    """After a crash: remove temporary files (never answered Success); record complete files that
    were not recorded. Returns what was recorded, so that the caller can enqueue it.

    Safe while the listener receives (:class:`DatabaseWatch`): no :func:`keep` runs meanwhile."""
    with _GATE.exclusive():
        return _recover()


def _recover() -> IngestReport:
    folder = received_folder()
    if not folder.is_dir():
        return IngestReport()
    removed = 0
    for entry in os.scandir(folder):
        if entry.name.startswith(".") and entry.name.endswith(PART_SUFFIX):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    if removed:
        log.warning("removed %s partly received instance(s) left by a stop (never acknowledged)", removed)
    ignored: Counter[str] = Counter()
    report = ingest_paths(walk(folder, ignored))
    if report.images:
        log.info("recorded %s received instance(s) a stop left unrecorded", report.images)
    return report


class DatabaseWatch:
    """Notices that PostgreSQL restarted under a running listener, and then records again what it may
    have lost: the listener's commits do not wait for their WAL flush (:func:`sendit.relay.ingest.
    ingest_new_file`), so a crash of PostgreSQL (the OOM killer, a power cut of its own host) can take
    the last fraction of a second of rows with it, of instances already answered Success. Their
    files are durable; :func:`recover` records them, as every start does.

    :meth:`check` is called about once a second by one thread (the listener's). It holds a
    connection of its own, open from one check to the next: a restart of PostgreSQL, or its
    recovery after a crash of one backend, ends every connection, so the next check fails (noted),
    and the first that succeeds after it runs :func:`recover`. SQLite needs none of it (its commits
    survive the process, and a crash of the host restarts the listener, which recovers at start).
    """

    def __init__(self) -> None:
        self.lost = False  # the connection broke: rows may be gone once the database is back
        self._own: Any = None  # the watch's own connection (psycopg), never Django's

    def check(self) -> IngestReport | None:
        """One look; returns what a recovery recorded (for the caller to track), or None. Raises when
        the recovery itself fails (the database failed again): still lost, the next check retries."""
        if connection.vendor != "postgresql":
            return None
        try:
            if self._own is None:
                self._own = connection.get_new_connection(connection.get_connection_params())
                self._own.autocommit = True  # never idle in a transaction between two checks
            self._own.execute("SELECT 1")
        except Exception as exc:
            if not self.lost:
                log.warning(
                    "the database connection broke (%s); received instances are checked once it is back",
                    type(exc).__name__,
                )
            self.lost = True
            self.close()
            return None
        if not self.lost:
            return None
        try:
            report = recover()
        except Exception:
            connection.close()  # broken: the next look opens a fresh one
            raise
        self.lost = False
        log.info("the database is back: %s received instance(s) recorded again", report.images)
        return report

    def close(self) -> None:
        own, self._own = self._own, None
        if own is not None:
            with contextlib.suppress(Exception):
                own.close()

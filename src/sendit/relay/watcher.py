"""Watches the input folder: inotify events (watchdog) trigger a scan; a periodic rescan is the safety net.

A scan ingests every complete file not yet recorded and enqueues its series. Nothing under a name
in progress (`NAME.tmpXXXX`) is touched; after a restart the first scan finds whatever was not yet
ingested. Each scan's outcome is written to ScanState (``record_scan``): a scan that fails as a whole
(the folder unreadable, the database down) is shown on the dashboard, /health and /metrics, not only
logged.

Producers that write in place (docs/operations.md, Settle time): a file is taken once nothing in its
folder changed for STABLE_SECONDS (:class:`sendit.relay.ingest.Settle`), and the watcher scans again
when the first file it left settles. A rename it sees from a `.tmp` or hidden name, or into the input
folder from outside it, is complete at once. A folder it took files from and finds empty is removed
once settled; one it never took a file from (made for a producer) is left alone.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from django.db import close_old_connections
from django.db.models import F
from django.utils import timezone
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from sendit.dicomio.walk import hidden, in_progress
from sendit.relay import files
from sendit.relay.ingest import IngestReport, Settle, ingest_folder_in_chunks, series_left_behind
from sendit.relay.models import ScanState
from sendit.relay.runtime import config

log = logging.getLogger("sendit.watcher")


def record_scan(
    started: datetime,
    ok: bool,
    error: str = "",
    ignored: Mapping[str, int] | None = None,
    name: str | None = None,
) -> None:
    """Write the outcome of one scan to this host's ScanState row; never raises (the database may be down).

    Fields: ``name`` the watcher's host; ``started``/``finished`` the last scan; ``ok`` whether it
    went through; ``error`` a fixed phrase with the exception type, never a path or a value;
    ``failures`` consecutive failed scans (0 after a good one); ``ignored`` the last good scan's
    entries left alone by rule, by reason (``in_progress``, ``hidden``, ``rejected_earlier``,
    ``settling``).
    """
    host = name or socket.gethostname()
    finished = timezone.now()
    try:
        if ok:
            ScanState.objects.update_or_create(
                name=host,
                defaults={
                    "started": started,
                    "finished": finished,
                    "ok": True,
                    "error": "",
                    "failures": 0,
                    "ignored": dict(ignored or {}),
                },
            )
            return
        changed = ScanState.objects.filter(name=host).update(
            started=started, finished=finished, ok=False, error=error[:500], failures=F("failures") + 1
        )
        if not changed:
            ScanState.objects.get_or_create(
                name=host,
                defaults={"started": started, "finished": finished, "ok": False, "error": error[:500], "failures": 1},
            )
    except Exception as exc:  # the watcher must outlive a database that is down; the log says so
        log.error("could not record the scan's state (%s)", type(exc).__name__)


def scan_error(exc: BaseException, stage: str = "scan") -> str:
    """The fixed phrase for a failed scan: what failed and the exception type, no text from it."""
    if stage == "queue":
        return f"could not queue the ingested series ({type(exc).__name__})"
    if isinstance(exc, OSError):
        return f"the input folder cannot be read ({type(exc).__name__})"
    return f"scan of the input folder failed ({type(exc).__name__})"


class _Poke(FileSystemEventHandler):
    """Wakes the scan; hands each rename (source, target) to ``moved`` first, so that the scan knows it.

    Not for what happens below a hidden name only (``unseen``): the scan never reads there, so such
    an event cannot give it anything to take. The C-STORE listener writes every instance it
    receives below ``.sendit-received``: without this, each one woke a scan of the whole input
    folder (and its queries over every image in flight) while the next instance arrived.
    """

    def __init__(self, wake: threading.Event, moved: Callable[[str, str], None], unseen: Callable[[str], bool]) -> None:
        self.wake = wake
        self.moved = moved
        self.unseen = unseen

    def on_any_event(self, event: FileSystemEvent) -> None:
        source = os.fsdecode(event.src_path)
        if event.event_type == "moved":
            target = os.fsdecode(event.dest_path)
            if self.unseen(source) and self.unseen(target):
                return
            self.moved(source, target)
        elif self.unseen(source):
            return
        if event.event_type in ("created", "moved", "closed"):
            self.wake.set()


def _observer() -> BaseObserver:
    """inotify with full move events on Linux: a rename into the input folder from outside it comes
    as a move with no source, not as a creation (which a file written in place also is)."""
    if sys.platform.startswith("linux"):
        from watchdog.observers.inotify import InotifyObserver

        return InotifyObserver(generate_full_events=True)
    return Observer()


def _pending(name: str) -> bool:
    return in_progress(name) or hidden(name)


class Watcher:
    """Runs in a thread of `sendit run`; ``on_ingest`` receives the series a scan hands on (to
    enqueue), chunk by chunk, each once the walk has left it."""

    def __init__(
        self, root: Path, rescan_seconds: float, on_ingest: Callable[[IngestReport], None], settle: float = 0.2
    ) -> None:
        self.root = root
        self.rescan_seconds = rescan_seconds
        self.on_ingest = on_ingest
        self.settle = settle  # a burst of events (one rename, many files) is one scan
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.observer = _observer()
        self.thread = threading.Thread(target=self._loop, name="sendit-watcher", daemon=True)
        self.due: float | None = None  # when a file or folder the last scan left settles (time.time())
        self._arrived: dict[Path, float] = {}  # complete by a rename seen then (resolved path → time.time())
        self._held: set[Path] = set()  # folders this watcher took files from, and their parents
        self._lock = threading.Lock()  # _arrived: written by the observer's thread

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.observer.schedule(_Poke(self.wake, self._moved, self._unseen), str(self.root), recursive=True)
        self.observer.start()
        self.wake.set()  # the first scan finds what arrived while we were down
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.observer.stop()
        self.observer.join(timeout=5)
        self.thread.join(timeout=30)

    def _inside(self, path: str) -> list[str] | None:
        """A path's names below the input folder, or None when it is not below it."""
        if not path:
            return None
        rel = os.path.relpath(path, self.root)
        if rel in (os.curdir, os.pardir) or rel.startswith(os.pardir + os.sep):
            return None
        return rel.split(os.sep)

    def _unseen(self, path: str) -> bool:
        """Below a hidden name of the input folder (``.sendit-received``, an editor's ``.swp``): never scanned."""
        names = self._inside(path)
        return names is not None and any(hidden(name) for name in names)

    def _moved(self, source: str, target: str) -> None:
        """Remember a rename that says its files are complete: from a `.tmp` or hidden name, or into
        the input folder from outside it (an atomic move). A rename between two complete names says
        nothing: a file written in place is not finished by moving it."""
        names = self._inside(target)
        if names is None or any(_pending(name) for name in names):
            return
        before = self._inside(source)
        if before is not None and not any(_pending(name) for name in before):
            return
        with self._lock:
            self._arrived[self.root.resolve().joinpath(*names)] = time.time()

    def _arrivals(self, now: float, stable: float) -> dict[Path, float]:
        """The renames to trust in this scan; older ones are dropped (by now the settle time covers them)."""
        with self._lock:
            self._arrived = {path: seen for path, seen in self._arrived.items() if now - seen <= stable}
            return dict(self._arrived)

    def _tidy(self, listed: Mapping[Path, int], taken_from: set[Path], stable: float) -> float | None:
        """1. Remember the folders this scan took files from, with their parents, while they hold
        anything. 2. Remove those that are now empty and settled (and their emptied, settled parents).
        3. Return when the next one settles.

        Clean-up leaves a folder that changed within STABLE_SECONDS (a producer may still write
        there); this is where it goes once settled. Never raises.
        """
        top = self.root.resolve()
        held = {folder for folder in self._held if listed.get(folder)}  # still holding something
        for folder in taken_from:
            while folder != top and top in folder.parents and folder not in held:
                held.add(folder)
                folder = folder.parent
        now = time.time()
        due: float | None = None
        emptied = [folder for folder, count in listed.items() if not count and folder in self._held]
        for folder in sorted(emptied, key=lambda path: len(path.parts), reverse=True):  # the deepest first
            changed = files.last_change(folder)
            if changed is None:
                continue  # gone meanwhile
            if changed + stable > now:
                held.add(folder)  # not yet: the next scan looks again
                due = changed + stable if due is None else min(due, changed + stable)
                continue
            files.remove_empty_parents(folder)
        self._held = held
        return due

    def scan(self) -> IngestReport:
        """One scan; its outcome goes to ScanState. Raises when the scan fails as a whole (after recording it)."""
        started = timezone.now()
        stable = config().STABLE_SECONDS
        now = time.time()
        settle = Settle(stable, self._arrivals(now, stable), now=now)
        listed: dict[Path, int] = {}
        self.due = None
        report = IngestReport()
        close_old_connections()
        chunks = series_left_behind(ingest_folder_in_chunks(self.root, settle, listed=listed.__setitem__))
        while True:
            try:
                part, ready = next(chunks, (None, set()))
            except Exception as exc:
                close_old_connections()  # a connection the failure broke is replaced for the record
                record_scan(started, ok=False, error=scan_error(exc))
                raise
            if part is None:
                break
            report.add(part)
            if ready:  # the workers start on what the walk has left while it reads on (issue 17)
                self._hand_on(IngestReport(series_ids=ready), started)
        emptied = self._tidy(listed, settle.taken_from, stable)
        self.due = min((due for due in (settle.due, emptied) if due is not None), default=None)
        if report.images or report.reprocessed or report.problems:
            log.info(
                "ingested %s image(s) in %s series; %s rejected, %s skipped, %s quarantined",
                report.images,
                len(report.series_ids),
                report.rejected,
                report.skipped,
                report.quarantined,
            )
        record_scan(started, ok=True, ignored=report.ignored)
        return report

    def _hand_on(self, handed: IngestReport, started: datetime) -> None:
        try:
            self.on_ingest(handed)
        except Exception as exc:
            record_scan(started, ok=False, error=scan_error(exc, "queue"))
            raise

    def _until_next_scan(self) -> float:
        """RESCAN_SECONDS, or less when something the last scan left settles sooner."""
        if self.due is None:
            return self.rescan_seconds
        return min(self.rescan_seconds, max(self.due - time.time(), 0.0) + 0.05)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(timeout=self._until_next_scan())
            if self.stopping.is_set():
                return
            time.sleep(self.settle)  # let a burst of events (one rename, many files) settle
            self.wake.clear()
            try:
                self.scan()
            except Exception as exc:  # the watcher must outlive a bad scan; the next one tries again
                # the type only: a database error's text can quote a UID or a value
                log.error(
                    "scan of the input folder failed (%s); retrying at the next event or rescan", type(exc).__name__
                )

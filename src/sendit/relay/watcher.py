"""Watches the input folder: inotify events (watchdog) trigger a scan; a periodic rescan is the safety net.

A scan ingests every complete file not yet recorded and enqueues its series. Nothing under a name
in progress (`NAME.tmpXXXX`) is touched; after a restart the first scan finds whatever was not yet
ingested. Each scan's outcome is written to ScanState (``record_scan``): a scan that fails as a whole
(the folder unreadable, the database down) is shown on the dashboard, /health and /metrics, not only
logged.
"""

from __future__ import annotations

import logging
import socket
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

from sendit.relay.ingest import IngestReport, ingest_folder
from sendit.relay.models import ScanState

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
    entries left alone by rule, by reason (``in_progress``, ``hidden``, ``rejected_earlier``).
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
    def __init__(self, wake: threading.Event) -> None:
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("created", "moved", "closed"):
            self.wake.set()


class Watcher:
    """Runs in a thread of `sendit run`; ``on_ingest`` receives each scan's report (to enqueue)."""

    def __init__(
        self, root: Path, rescan_seconds: float, on_ingest: Callable[[IngestReport], None], settle: float = 0.2
    ) -> None:
        self.root = root
        self.rescan_seconds = rescan_seconds
        self.on_ingest = on_ingest
        self.settle = settle
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.observer = Observer()
        self.thread = threading.Thread(target=self._loop, name="sendit-watcher", daemon=True)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.observer.schedule(_Poke(self.wake), str(self.root), recursive=True)
        self.observer.start()
        self.wake.set()  # the first scan finds what arrived while we were down
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.observer.stop()
        self.observer.join(timeout=5)
        self.thread.join(timeout=30)

    def scan(self) -> IngestReport:
        """One scan; its outcome goes to ScanState. Raises when the scan fails as a whole (after recording it)."""
        started = timezone.now()
        try:
            close_old_connections()
            report = ingest_folder(self.root)
        except Exception as exc:
            close_old_connections()  # a connection the failure broke is replaced for the record
            record_scan(started, ok=False, error=scan_error(exc))
            raise
        if report.images or report.reprocessed or report.problems:
            log.info(
                "ingested %s image(s) in %s series; %s rejected, %s skipped, %s quarantined",
                report.images,
                len(report.series_ids),
                report.rejected,
                report.skipped,
                report.quarantined,
            )
        try:
            self.on_ingest(report)
        except Exception as exc:
            record_scan(started, ok=False, error=scan_error(exc, "queue"))
            raise
        record_scan(started, ok=True, ignored=report.ignored)
        return report

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(timeout=self.rescan_seconds)
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
